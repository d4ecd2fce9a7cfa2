"""The network types besides kohya's LoRA: LyCORIS (LoCon, LoHa, LoKr, IA3, GLoRA, Full, Diag-OFT,
BOFT, and DoRA on LoRA/LoCon/LoHa/LoKr), trained with the ``lycoris-lora`` package the way kohya_ss
drives it (``--network_module lycoris.kohya --network_args algo=... ``).

The modules, their targets (lycoris-lora's presets), their initialisation and their forward are
lycoris-lora's own ``LycorisNetworkKohya``; this module only

* chooses which network a run trains (``network_spec``: kohya LoRA through peft in ``network.py``,
  everything else here) and applies it (``apply_network``, called by the model families);
* names the text encoder's modules ``lora_te_text_model_...`` as A1111, Forge and ComfyUI expect
  (transformers 5 dropped the ``text_model.`` level of ``CLIPTextModel``), and, for a family whose
  files name the U-Net by another layout (SDXL: the original U-Net's ``input_blocks_4_1_...``),
  renames the U-Net's modules to it, as lycoris-lora names them under sd-scripts' SDXL U-Net;
* reads and writes the file: LyCORIS keys (``lora_unet_<path>.hada_w1_a`` for LoHa,
  ``.lokr_w1`` for LoKr, ``.dora_scale`` for DoRA, ``.diff`` for Full, ``.oft_blocks``, ``.alpha``),
  with ``ss_network_module = lycoris.kohya`` and ``ss_network_args`` (algo and its arguments);
* tells the type of a file from its keys, so that a file of another type gets a sentence.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

NETWORK_MODULE = "lycoris.kohya"
# our network_type -> lycoris-lora's algo name (lycoris/wrapper.py network_module_dict).
ALGOS = {"LoCon": "locon", "LoHa": "loha", "LoKr": "lokr", "IA3": "ia3", "GLoRA": "glora",
         "Full": "full", "Diag-OFT": "diag-oft", "BOFT": "boft"}
# LycorisNetworkKohya keeps its targets in class attributes that ``apply_preset`` overwrites; they are
# put back after every network we build, so one run's preset never leaks into the next.
_PRESET_ATTRS = ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                 "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME",
                 "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")


def uses_lycoris(settings) -> bool:
    adv = settings.advanced
    return adv.network_type != "LoRA" or adv.dora_wd


@dataclass(frozen=True)
class LycorisSpec:
    """A LyCORIS network: the algo, ranks and alphas, and lycoris-lora's options."""

    network_type: str  # ours: LoRA (with DoRA), LoCon, LoHa, ...
    rank: int
    alpha: float
    conv_rank: int  # 0 = no kxk convolutions
    conv_alpha: float
    preset: str
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    dora_wd: bool = False
    factor: int = -1
    decompose_both: bool = False
    use_tucker: bool = False
    use_scalar: bool = False
    rank_dropout_scale: bool = False
    train_norm: bool = False
    bypass_mode: bool = False
    constraint: float = 0.0
    rescaled: bool = False
    train_unet: bool = True
    train_text_encoder: bool = True

    @classmethod
    def from_settings(cls, settings) -> LycorisSpec:
        tr, adv = settings.training, settings.advanced
        return cls(
            network_type=adv.network_type, rank=tr.network_dim, alpha=tr.network_alpha,
            conv_rank=adv.conv_dim, conv_alpha=adv.conv_alpha, preset=adv.lycoris_preset,
            dropout=adv.network_dropout,
            # kohya's rank/module dropout are declared with kohya's LoRA options (when present).
            rank_dropout=getattr(adv, "rank_dropout", 0.0), module_dropout=getattr(adv, "module_dropout", 0.0),
            dora_wd=adv.dora_wd, factor=adv.factor, decompose_both=adv.decompose_both,
            use_tucker=adv.use_tucker, use_scalar=adv.use_scalar,
            rank_dropout_scale=adv.rank_dropout_scale, train_norm=adv.train_norm,
            bypass_mode=adv.bypass_mode, constraint=adv.constrain, rescaled=adv.rescaled,
            train_unet=settings.train_unet, train_text_encoder=settings.train_text_encoder)

    @property
    def algo(self) -> str:
        # DoRA on a plain LoRA is LyCORIS' LoCon algorithm (lora_down/lora_up) with weight decomposition.
        return ALGOS.get(self.network_type, "locon")

    @property
    def label(self) -> str:
        return spec_label(self)

    def network_args(self) -> dict[str, str]:
        """``ss_network_args``: what kohya_ss passes as --network_args for this algo (strings)."""
        args = {"algo": self.algo, "preset": self.preset, "conv_dim": str(self.conv_rank),
                "conv_alpha": str(self.conv_alpha)}
        if self.algo != "ia3":
            args.update(use_tucker=str(self.use_tucker), use_scalar=str(self.use_scalar),
                        rank_dropout=str(self.rank_dropout), module_dropout=str(self.module_dropout),
                        rank_dropout_scale=str(self.rank_dropout_scale))
        if self.algo in ("locon", "loha", "lokr"):
            args.update(dora_wd=str(self.dora_wd), bypass_mode=str(self.bypass_mode))
        if self.algo == "lokr":
            args.update(factor=str(self.factor), decompose_both=str(self.decompose_both))
        if self.algo == "diag-oft":
            args.update(constraint=str(self.constraint), rescaled=str(self.rescaled))
        if self.dropout:
            args["dropout"] = str(self.dropout)
        args["train_norm"] = str(self.train_norm)
        return args


def network_spec(settings, blocks=None):
    """The network a run trains: kohya's LoRA (peft, ``NetworkSpec``; ``blocks`` the U-Net's block
    numbering, ``blocks.block_layout``) or a LyCORIS one."""
    from lora_gui.engine.network import NetworkSpec

    if uses_lycoris(settings):
        return LycorisSpec.from_settings(settings)
    return NetworkSpec.from_settings(settings, **({"blocks": blocks} if blocks else {}))


def apply_network(unet: nn.Module | None, text_encoders, spec):
    """Inject the network ``spec`` describes into the U-Net and the text encoder(s) (one module or
    a list: SDXL's two are named lora_te1_ / lora_te2_ as kohya names them)."""
    if isinstance(spec, LycorisSpec):
        return LycorisNetwork.apply(unet, text_encoders, spec)
    from lora_gui.engine.network import LoraNetwork

    return LoraNetwork.apply(unet, text_encoders, spec)


# --- the type of a file --------------------------------------------------------------------------


def file_network_type(keys) -> str:
    """The network type of a LoRA file, from its key suffixes (LyCORIS' key format)."""
    keys = list(keys)
    dora = any(k.endswith(".dora_scale") for k in keys)
    kinds = [("LoHa", (".hada_w1_a",)), ("LoKr", (".lokr_w1", ".lokr_w1_a")), ("IA3", (".on_input",)),
             ("GLoRA", (".a1.weight",)), ("Full", (".diff",)), ("LoRA", (".lora_down.weight",))]
    for name, suffixes in kinds:
        if any(k.endswith(suffixes) for k in keys):
            return f"{name} with DoRA" if dora else name
    if any(k.endswith(".oft_blocks") for k in keys):
        return "OFT"  # Diag-OFT and BOFT differ by the tensor's rank; the keys alone cannot say
    return "unknown"


def spec_label(spec) -> str:
    """The type of the network a spec builds, in the words ``file_network_type`` uses."""
    kind = getattr(spec, "network_type", "LoRA")
    kind = "LoRA" if kind == "LoCon" else kind  # both are lora_down/lora_up files
    kind = "OFT" if kind in ("Diag-OFT", "BOFT") else kind
    return f"{kind} with DoRA" if getattr(spec, "dora_wd", False) else kind


def check_file_type(spec, tensors: dict, what: str = "The LoRA file") -> None:
    """A sentence (ValueError) when a file's network type is not the type this run trains."""
    found, wanted = file_network_type(tensors), spec_label(spec)
    if found != wanted:
        raise ValueError(f"{what} holds a {found} network but these settings train a {wanted} "
                         f"network: set advanced.network_type (and DoRA) to match the file, or "
                         f"choose a {wanted} file.")


# --- the network --------------------------------------------------------------------------------


@contextlib.contextmanager
def _preset(name: str, conv: bool, file_paths: Iterator[str] | None = None) -> Iterator[type]:
    """lycoris-lora's preset ``name`` on its network class for one build. ``file_paths``: the U-Net's
    module paths in the file's layout, when that is not diffusers' (SDXL)."""
    from lycoris.config import PRESET
    from lycoris.kohya import LycorisNetworkKohya as Net

    saved = {a: copy.copy(getattr(Net, a)) for a in _PRESET_ATTRS}
    preset = dict(PRESET[name])
    preset["enable_conv"] = preset.get("enable_conv", True) and conv  # our conv rank 0 = no kxk convs
    # lycoris-lora 4.x lists the class TimestepEmbedding (for Anima) and, by name, the SD U-Net's
    # time_embedding.linear_1/2, which *are* a TimestepEmbedding in diffusers: the same layers twice
    # ("duplicated lora name"). The names alone give the same modules and key names.
    preset["unet_target_module"] = [m for m in preset.get("unet_target_module", Net.UNET_TARGET_REPLACE_MODULE)
                                    if m != "TimestepEmbedding"]
    # attn-only names sd-scripts' own U-Net classes (CrossAttention); diffusers' U-Net, which the
    # engine trains, calls the same layers Attention (to_q/to_k/to_v/to_out.0, the same key names).
    if "CrossAttention" in preset["unet_target_module"]:
        preset["unet_target_module"].append("Attention")
    if file_paths is not None:
        # Module *names* in a preset are diffusers' (conv_in, time_embedding.linear_1); under sd-scripts'
        # SDXL U-Net (original names: input_blocks.0.0, time_embed.0) lycoris-lora matches none of them,
        # so neither do we: a name stays a target only if it names a module of the file's layout.
        paths = list(file_paths)
        preset["unet_target_name"] = [t for t in preset.get("unet_target_name", Net.UNET_TARGET_REPLACE_NAME)
                                      if any(t == p or re.match(t, p) for p in paths)]
    try:
        Net.apply_preset(preset)
        yield Net
    finally:
        for attr, value in saved.items():
            setattr(Net, attr, value)


def _kohya_named(text_encoder: nn.Module) -> nn.Module:
    """The text encoder under a ``text_model`` attribute, so LyCORIS names its modules
    ``lora_te_text_model_encoder_...`` (the CLIP key names every loader expects)."""
    if hasattr(text_encoder, "text_model"):
        return text_encoder
    holder = nn.Module()
    holder.text_model = text_encoder
    return holder


class LycorisNetwork:
    """A lycoris-lora network on a U-Net and text encoder(s), with the interface of ``LoraNetwork``."""

    def __init__(self, spec: LycorisSpec, net):
        self.spec = spec
        self.net = net

    @classmethod
    def apply(cls, unet: nn.Module | None, text_encoders, spec: LycorisSpec, *,
              unet_module_names: Mapping[str, str] | None = None) -> LycorisNetwork:
        """The network on the models; ``unet_module_names`` (diffusers module path -> the file's
        module path) names the U-Net's modules as the family's files do (SDXL's original names)."""
        if spec.train_unet and unet is None:
            raise ValueError("train_unet is set but no U-Net was given.")
        encoders = [] if text_encoders is None else (
            list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders])
        if spec.train_text_encoder and not encoders:
            raise ValueError("train_text_encoder is set but no text encoder was given.")
        for model in (unet, *encoders):
            if model is not None:
                if getattr(model, "_lora_gui_network", False):
                    raise ValueError(f"{type(model).__name__} already has a network; apply it to a fresh model.")
                model.requires_grad_(False)
        named = [_kohya_named(te) for te in encoders] if spec.train_text_encoder else []
        file_paths = None if unet_module_names is None else unet_module_names.values()
        with _preset(spec.preset, conv=spec.conv_rank > 0, file_paths=file_paths) as Net:
            net = Net(named if len(named) > 1 else (named[0] if named else None),
                      unet if spec.train_unet else nn.Module(), **_lycoris_kwargs(spec))
        if unet_module_names is not None:
            _rename_unet_modules(net, unet_module_names)
        net.apply_to(None, None, apply_text_encoder=spec.train_text_encoder, apply_unet=spec.train_unet)
        if not net.loras or (spec.train_unet and not net.unet_loras):
            part = "this model" if not net.loras else "the U-Net"
            raise ValueError(f"The {spec.preset} preset found no layers for {spec.network_type} in "
                             f"{part}: choose another LyCORIS preset.")
        device = next((p.device for m in (unet, *encoders) if m is not None for p in m.parameters()), None)
        net.to(device=device, dtype=torch.float32)  # the network trains in float32 on any base
        for model in (unet, *encoders):
            if model is not None:
                model._lora_gui_network = True
        network = cls(spec, net)
        network._follow_train_mode(unet, encoders)
        return network

    def _follow_train_mode(self, unet, encoders) -> None:
        # The LyCORIS modules are not submodules of the models they patch: dropout must follow the
        # model's train and eval modes, as peft's layers (inside the model) do.
        def follow(loras):
            def hook(module, args):
                for lora in loras:
                    lora.train(module.training)
            return hook

        if unet is not None and self.net.unet_loras:
            unet.register_forward_pre_hook(follow(self.net.unet_loras))
        for te in encoders:
            if self.net.text_encoder_loras:
                te.register_forward_pre_hook(follow(self.net.text_encoder_loras))

    @staticmethod
    def _params(loras) -> list[nn.Parameter]:
        return [p for lora in loras for p in lora.parameters() if p.requires_grad]

    def unet_parameters(self) -> list[nn.Parameter]:
        return self._params(self.net.unet_loras)

    def set_multiplier(self, multiplier: float) -> None:
        """The network's output scale (a LoRA's "strength"), as ``LoraNetwork.set_multiplier``."""
        self.net.set_multiplier(multiplier)

    def text_encoder_parameters(self) -> list[nn.Parameter]:
        return self._params(self.net.text_encoder_loras)

    def module_parameters(self, part: str) -> dict[str, tuple[list[nn.Parameter], list[nn.Parameter]]]:
        """kohya name -> (other parameters, ``lora_up`` parameters) of one part ("unet" or
        "text_encoder"): LoRA+ speeds up the parameters named lora_up, as lycoris-lora's
        ``prepare_optimizer_params`` does (LoHa, LoKr... have none)."""
        loras = self.net.unet_loras if part == "unet" else self.net.text_encoder_loras
        modules = {}
        for lora in loras:
            named = [(name, p) for name, p in lora.named_parameters() if p.requires_grad]
            modules[lora.lora_name] = ([p for name, p in named if "lora_up" not in name],
                                       [p for name, p in named if "lora_up" in name])
        return modules

    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        """lycoris-lora's max-norm regularisation (``apply_max_norm_regularization``, each module
        by its own rule): (modules scaled, mean and max norm of the scaled ones)."""
        device = next((p.device for p in self.net.parameters()), torch.device("cpu"))
        scaled, mean, largest = self.net.apply_max_norm_regularization(max_norm, device)
        return int(scaled), float(mean), float(largest)

    def module_names(self) -> dict[str, list[str]]:
        return {"unet": [m.lora_name for m in self.net.unet_loras],
                "text_encoder": [m.lora_name for m in self.net.text_encoder_loras]}

    def state_dict_kohya(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """LyCORIS keys -> CPU tensors; floating tensors in ``dtype`` (IA3's on_input flag stays an int)."""
        return {k: v.detach().to(device="cpu", dtype=dtype if v.is_floating_point() else v.dtype,
                                 copy=True).contiguous()
                for k, v in self.net.state_dict().items()}

    def load_state_dict_kohya(self, sd: dict[str, torch.Tensor]) -> None:
        """Load a LyCORIS file of this very network (start from a LoRA, resume)."""
        from lora_gui.engine.network import _key_mismatch_sentence

        check_file_type(self.spec, sd)
        own = self.net.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if missing or unexpected:
            raise ValueError(_key_mismatch_sentence(missing, unexpected))
        bad = [(k, list(sd[k].shape), list(v.shape)) for k, v in own.items() if sd[k].shape != v.shape]
        if bad:
            key, got, want = bad[0]
            raise ValueError(f"The LoRA file does not fit this network: {key} has shape {got} where the "
                             f"network expects {want}" + (f", and {len(bad) - 1} more tensors differ"
                                                          if len(bad) > 1 else "")
                             + "; set network_dim / conv_dim (and factor for LoKr) to the file's.")
        self.net.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


    # --- the state folder (resume) ---------------------------------------------------------------
    # LyCORIS Full trains the whole weight W and writes W - W0 to the file; W0 + (W - W0) is not W to
    # the last bit, so the state folder also keeps W itself, and resuming is bit-identical.
    _EXACT = ".exact_weight", ".exact_bias"

    def state_dict_exact(self) -> dict[str, torch.Tensor]:
        """The file's tensors plus what they do not hold exactly (a Full module's trained weight)."""
        sd = self.state_dict_kohya(torch.float32)
        for lora in self.net.loras:
            if lora.__class__.__name__ == "FullModule":
                for suffix, param in zip(self._EXACT, (lora.weight, lora.bias)):
                    if param is not None:
                        sd[lora.lora_name + suffix] = param.detach().to("cpu", copy=True).contiguous()
        return sd

    def load_state_dict_exact(self, sd: dict[str, torch.Tensor]) -> None:
        self.load_state_dict_kohya({k: v for k, v in sd.items() if not k.endswith(self._EXACT)})
        with torch.no_grad():
            for lora in self.net.loras:
                for suffix, param in zip(self._EXACT, (getattr(lora, "weight", None), getattr(lora, "bias", None))):
                    if lora.lora_name + suffix in sd and isinstance(param, nn.Parameter):
                        param.copy_(sd[lora.lora_name + suffix])


def _rename_unet_modules(net, module_names: Mapping[str, str]) -> None:
    """Name each U-Net module by the file's layout (``lora_unet_`` + its path there, dots as
    underscores), before ``apply_to`` registers the modules under their names (the file's keys)."""
    prefix = net.LORA_PREFIX_UNET
    renamed = {f"{prefix}_{src}".replace(".", "_"): f"{prefix}_{dst}".replace(".", "_")
               for src, dst in module_names.items()}
    unknown = [lora.lora_name for lora in net.unet_loras if lora.lora_name not in renamed]
    if unknown:
        raise ValueError(f"The U-Net module {unknown[0]} has no name in this model's LoRA file layout: choose "
                         "another LyCORIS preset.")
    for lora in net.unet_loras:
        lora.lora_name = renamed[lora.lora_name]


def _lycoris_kwargs(spec: LycorisSpec) -> dict:
    """LycorisNetworkKohya's arguments, as lycoris.kohya.create_network derives them from kohya's
    network_args (except conv_dim 0, which means no convolutions here, not conv_dim = network_dim)."""
    return dict(
        multiplier=1.0, lora_dim=spec.rank, conv_lora_dim=spec.conv_rank, alpha=spec.alpha,
        conv_alpha=spec.conv_alpha, dropout=spec.dropout, rank_dropout=spec.rank_dropout,
        module_dropout=spec.module_dropout, use_tucker=spec.use_tucker, network_module=spec.algo,
        train_norm=spec.train_norm, warn_on_unmatched=False,
        # passed on to every module (lycoris/modules/*.py keyword arguments)
        use_scalar=spec.use_scalar, decompose_both=spec.decompose_both, factor=spec.factor,
        block_size=4, constraint=spec.constraint, rescaled=spec.rescaled,
        weight_decompose=spec.dora_wd, wd_on_out=True, full_matrix=False,
        bypass_mode=spec.bypass_mode, rs_lora=False, unbalanced_factorization=False,
        rank_dropout_scale=spec.rank_dropout_scale)
