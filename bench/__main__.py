"""``python -m bench`` (``make bench``): benchmarks 1-5 on this machine, printed as tables and
appended, with the machine's description, to BENCHMARKS.md. They measure; they never fail a build.

    python -m bench                 # 1-5, 8 and 9 (about 12 minutes on 2 cores)
    python -m bench --only 1,5      # some of them
    python -m bench --no-report     # print only

6 and 7 (``bench/gpu_sd15.py``, ``bench/gpu_sdxl.py``) are for a CUDA machine and are run on their own;
8 and 9 (the SDXL and Flux demos: engine/bare ratio, memory estimate beside peak RSS) run on the CPU. Every process uses one
torch thread unless BENCH_THREADS says otherwise (see bench/common.py); BENCH_WORKDIR keeps the
scratch files (demo model, datasets, runs) in a folder of your choice.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from bench import common

BENCHMARKS = {
    "1": ("engine_overhead", "1. Engine overhead"),
    "2": ("throughput", "2. Throughput"),
    "3": ("startup", "3. Start-up"),
    "4": ("streaming", "4. Streaming"),
    "5": ("scale", "5. Scale"),
    "8": ("sdxl_demo", "8. SDXL demo"),
    "9": ("flux_demo", "9. Flux demo"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated numbers (1-5)")
    parser.add_argument("--no-report", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    common.setup()
    work = common.workdir()
    print(f"lora-gui benchmarks; scratch folder {work}", flush=True)
    print(", ".join(f"{k}: {v}" for k, v in common.machine().items()), flush=True)
    common.demo(work)
    t0 = time.perf_counter()
    sections = []
    for number in [n.strip() for n in args.only.split(",") if n.strip()]:
        module_name, title = BENCHMARKS[number]
        print(f"\n--- running {title} ...", flush=True)
        started = time.perf_counter()
        try:
            module = __import__(f"bench.{module_name}", fromlist=["run"])
            section = module.run(work)
        except Exception as exc:  # noqa: BLE001 - a benchmark that breaks is reported, not fatal
            traceback.print_exc()
            section = common.Section(title, "", [f"Failed: {type(exc).__name__}: {exc}"],
                                     seconds=time.perf_counter() - started)
        sections.append(section)
        common.print_section(section)
    total = time.perf_counter() - t0
    sections.append(common.Section("Total", "", [f"python -m bench took {total:.0f} s."]))
    if not args.no_report:
        common.append_report(sections)
        print(f"Appended to {common.REPORT}", flush=True)
    print(f"Total {total:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
