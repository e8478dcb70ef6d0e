"""The teacher-output store: a frozen teacher's answers, computed once, read by every job.

Every distillation step used to rerun the teacher, and every job of a sweep did it again on the
same sentences. The store runs the teacher once per (teacher fingerprint, task data, layers,
logit top-k, precision) over the whole train split and keeps its FULL hidden states at those
layers, a classifier teacher's class logits and, for a causal-LM teacher whose strategy asks for
logit KD, its log-probabilities per KD row: the whole vocabulary row, or the top-k when the
strategy asks for top-k logit KD (`strategy.logit_topk`; `stored_request`). Whatever a
strategy makes of them (flexkd's k selected dims or directions, whichever score chose them; a
projector; CKA; logit KD) is applied at read time by the same code that reads the live teacher,
so one entry serves every strategy at those layers. It is a `flexkd.cache` entry (content key,
verified, rebuilt when damaged, built once under a file lock when sweep jobs start together):

    store.json          shapes, dtypes, the stored request
    offsets.bin         int64 (n_examples + 1): example i's tokens are rows offsets[i]:offsets[i+1]
    hidden_<l>.bin      bf16 (n_tokens, d_T): the valid (non-padding) teacher tokens of layer l
    logits.bin          bf16 (n_examples, n_classes): class logits
    kd_offsets.bin      int64 (n_examples + 1): example i's KD rows (the positions that predict
                        its response tokens) are rows kd_offsets[i]:kd_offsets[i+1]
    topk_logprobs.bin   bf16 (n_kd_rows, k): the teacher's top-k log-probabilities at the
                        strategy's temperature (`losses.teacher_topk`), descending
    topk_ids.bin        int32 (n_kd_rows, k): their vocabulary ids
    topk_rest.bin       fp32 (n_kd_rows,): the log of the mass outside the top k
    kd_logprobs.bin     bf16 (n_kd_rows, V): without top-k, the teacher's log-softmax over the
                        whole vocabulary (log-probs, not logits: bf16 keeps the likely tokens'
                        values to 3 digits, where raw logits of 20-30 would lose them; every
                        divergence reads them as logits, softmax being shift-invariant)

Whole vocabulary rows are only for response tokens (a headline: about 8 rows of 49,152 per
article), and only up to DENSE_MAX_GIB; past it dense logit KD reads the live teacher. The
files are memory-mapped, so a job reads only the rows of its batches. `StoredTeacher` is a
`flexkd.step.TeacherOutputs` like `LiveTeacher`: it rebuilds each batch's padded shape from
batch["index"] and the teacher attention mask, and its KD rows in the live teacher's order, so
the step cannot tell it from the live teacher (up to bf16 rounding of the stored values).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flexkd import losses
from flexkd.cache import EntryInfo, get_or_build, read_manifest
from flexkd.errors import ConfigError
from flexkd.models import ModelOutputs, TaskModel, response_positions
from flexkd.storage import atomic_write_json, content_hash
from flexkd.strategies.base import OutputRequest
from flexkd.training import precision_key

log = logging.getLogger(__name__)

STORE_KIND = "teacher_store"
# 2: full states (no views), classifier logits always; 3: a causal LM's top-k per KD row
STORE_VERSION = 3
STORE_DTYPE = torch.bfloat16
SETTINGS = ("auto", "off")
META_FILE = "store.json"
OFFSETS_FILE = "offsets.bin"
KD_OFFSETS_FILE = "kd_offsets.bin"
TOPK_FILES = {"logprobs": "topk_logprobs.bin", "ids": "topk_ids.bin", "rest": "topk_rest.bin"}
DENSE_FILE = "kd_logprobs.bin"
# Rows per teacher_topk / log_softmax call while building: bounds the fp32 (rows, V) temporaries.
TOPK_CHUNK_ROWS = 1024
# Whole-vocabulary rows past this size read the live teacher instead.
DENSE_MAX_GIB = 4.0


class StoreMismatchError(RuntimeError):
    """A batch does not match the store (other data or tokenizer than it was built from)."""


# ----------------------------------------------------------------------------- the decision

def store_decision(setting: str, strategy, teacher: TaskModel | None) -> tuple[bool, str]:
    """Whether a run reads the teacher from a store, and why (for the log and results.json).

    `auto` stores when the teacher's answer for an example is a fixed function of that example:
    the teacher is frozen (DistillationModule never trains it) and runs in eval mode (dropout
    off: LiveTeacher forces it), its inputs are the example's token ids, fixed at encoding (no
    augmentation), padding cannot reach valid tokens (attention masks), and the answer is one
    the store can hold: hidden states, class logits, or a causal LM's log-probs per KD row
    (top-k or whole rows). Chunked logit KD (`logit_chunk_rows`, which may recompute the
    teacher's logits from its LM head) and ULD (which may pair rows across two tokenizers)
    read the live teacher; so does a whole-vocabulary store over DENSE_MAX_GIB
    (`teacher_store` checks, once the data is known). Precision is part of the store's key."""
    if setting not in SETTINGS:
        raise ConfigError(f"teacher_store={setting!r}; choose one of {SETTINGS}")
    if setting == "off":
        return False, "teacher_store=off"
    if not strategy.needs_teacher or teacher is None:
        return False, f"strategy {strategy.name!r} needs no teacher outputs"
    request = strategy.teacher_request()
    if request.logits and teacher.kind == "causal_lm" and request.topk is None:
        if getattr(strategy, "logit_chunk_rows", None) is not None:
            return False, ("chunked logit KD (strategy.logit_chunk_rows) reads the live teacher; "
                           "set it to null to read the teacher's log-probs from the store")
        if getattr(strategy, "divergence", None) == "uld":
            return False, "ULD logit KD reads the live teacher (its rows may pair two tokenizers)"
    return True, "the teacher is frozen and deterministic (eval mode, fixed inputs)"


def stored_request(strategy, teacher: TaskModel) -> OutputRequest:
    """What the store keeps for `strategy`: wider than what it asks, so that every strategy on
    this teacher and layers shares one entry (and one teacher pass).

    - Full hidden states (no views): flexkd's selection (any score, k, selection) is applied at
      read time, as on the live teacher.
    - Class logits always for a classifier (n_classes per example: tiny).
    - A classifier strategy that asks for no layers (logit_kd: beta = 0) stores the teacher
      layers of its layer_pairs anyway, so it shares the feature strategies' entry at that layer.
    - A causal LM's logits as the strategy's top-k at its temperature (k and T are part of the
      key), or as whole log-softmax rows (any temperature at read time); a classifier's class
      logits serve any k at read time, so there they are not.
    Layers are sorted and deduplicated: the entry depends on the set, not on the pair order."""
    request = strategy.teacher_request()
    classifier = teacher.kind == "classifier"
    layers = request.layers
    if classifier and not layers:
        layers = tuple(t for _, t in strategy.resolved_pairs)
    topk = request.topk if request.logits and not classifier else None
    return OutputRequest(layers=tuple(sorted({int(x) for x in layers})),
                         logits=classifier or request.logits, topk=topk,
                         topk_temperature=None if topk is None else float(request.topk_temperature))


def request_key(request) -> dict:
    """A JSON-able identity of what the strategy asks the teacher for."""
    views = []
    for view in getattr(request, "views", ()) or ():
        if view is None:
            views.append(None)
        elif view.dim() == 1:
            views.append({"dims": [int(i) for i in view.tolist()]})
        else:
            data = view.detach().float().cpu().contiguous().numpy().tobytes()
            views.append({"projection": list(view.shape), "sha": content_hash(data.hex())})
    key = {"layers": [int(x) for x in request.layers], "logits": bool(request.logits),
           "views": views}
    if getattr(request, "topk", None) is not None:  # absent otherwise: the old keys stay as they were
        key |= {"topk": int(request.topk), "topk_temperature": float(request.topk_temperature)}
    return key


# ----------------------------------------------------------------------------- reading

def _open(path: Path, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A read-only memory map of a flat file as a tensor (copy-on-write: never changes the file)."""
    numel = int(np.prod(shape)) if shape else 0
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.from_file(str(path), shared=False, size=numel, dtype=dtype)
    return flat.view(shape)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _spans(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Flat store rows of consecutive per-example runs: example b's j-th row is starts[b] + j,
    listed example after example (the row-major order of a batch's boolean mask)."""
    first = torch.cumsum(counts, 0) - counts
    return torch.repeat_interleave(starts - first, counts) + torch.arange(int(counts.sum()))


class StoredTeacher:
    """Answers batches from a store entry, in the live teacher's shapes and dtypes: full hidden
    states (`reduced=False`, so a strategy reduces them exactly as it reduces the live
    teacher's), the class logits, a causal LM's whole log-prob rows as its `kd_logits`, or its
    top-k per KD row as `kd_topk` (with `kd_logits=None`: the strategy's logit term then reads
    the top-k, `teacher_topk_of`).

    `layers`: the layers to answer with (the strategy's request: a logit-only strategy reads
    none), all stored ones when None."""

    def __init__(self, path: str | Path, layers: tuple[int, ...] | None = None):
        self.path = Path(path)
        meta = json.loads((self.path / META_FILE).read_text())
        self.meta = meta
        n = meta["examples"]
        self.offsets = _open(self.path / OFFSETS_FILE, torch.int64, (n + 1,))
        if int(self.offsets[-1]) != meta["tokens"]:
            raise StoreMismatchError(f"{OFFSETS_FILE} ends at {int(self.offsets[-1])}, not at "
                                     f"{meta['tokens']} tokens")
        stored = {int(layer): spec for layer, spec in meta["hidden"].items()}
        wanted = sorted(stored) if layers is None else [int(x) for x in layers]
        missing = sorted(set(wanted) - set(stored))
        if missing:
            raise StoreMismatchError(f"teacher layers {missing} are not in the store (it holds "
                                     f"{sorted(stored)})")
        self.hidden = {layer: (_open(self.path / stored[layer]["file"], STORE_DTYPE,
                                     (meta["tokens"], stored[layer]["width"])),
                               _dtype(stored[layer]["dtype"]))
                       for layer in wanted}
        spec = meta.get("logits")
        self.logits = None if spec is None else (
            _open(self.path / spec["file"], STORE_DTYPE, (n, spec["width"])), _dtype(spec["dtype"]))
        self.topk = self.dense = None
        spec = meta.get("topk") or meta.get("dense")  # a causal LM's KD rows, either kind
        if spec is not None:
            self.kd_offsets = _open(self.path / spec["offsets"], torch.int64, (n + 1,))
            if int(self.kd_offsets[-1]) != spec["rows"]:
                raise StoreMismatchError(f"{spec['offsets']} ends at {int(self.kd_offsets[-1])}, "
                                         f"not at {spec['rows']} KD rows")
        spec = meta.get("dense")
        if spec is not None:
            self.dense = (_open(self.path / spec["file"], STORE_DTYPE, (spec["rows"], spec["vocab"])),
                          _dtype(spec["dtype"]))
        spec = meta.get("topk")
        if spec is not None:
            rows, k = spec["rows"], spec["k"]
            files = spec["files"]
            self.topk = losses.TeacherTopK(
                logprobs=_open(self.path / files["logprobs"], STORE_DTYPE, (rows, k)),
                ids=_open(self.path / files["ids"], torch.int32, (rows, k)),
                rest_logprob=_open(self.path / files["rest"], torch.float32, (rows,)))

    @property
    def examples(self) -> int:
        return self.meta["examples"]

    def _rows(self, offsets: torch.Tensor, index: torch.Tensor, counts: torch.Tensor,
              what: str) -> torch.Tensor:
        """The store rows of the batch's examples (`counts` rows each, as the batch has them),
        example after example in batch order."""
        if int(index.max()) >= self.examples or int(index.min()) < 0:
            raise StoreMismatchError(f"batch index {int(index.max())} is outside the store's "
                                     f"{self.examples} training examples")
        starts = offsets[index]
        if not torch.equal(offsets[index + 1] - starts, counts):
            raise StoreMismatchError(f"the batch's teacher {what} counts differ from the store's; it "
                                     "was built from other data or another teacher tokenizer")
        return _spans(starts, counts)

    def __call__(self, batch: dict) -> ModelOutputs:
        index = batch["index"].cpu()
        mask = batch["teacher"]["attention_mask"].bool()
        device = mask.device
        hidden = {}
        if self.hidden:
            rows = self._rows(self.offsets, index, mask.sum(1).cpu(), "token")
            for layer, (flat, dtype) in self.hidden.items():
                padded = torch.zeros(*mask.shape, flat.shape[1], dtype=dtype, device=device)
                padded[mask] = flat[rows].to(device=device, dtype=dtype)
                hidden[layer] = padded
        kd_logits = kd_topk = None
        if self.logits is not None:
            flat, dtype = self.logits
            kd_logits = flat[index].to(device=device, dtype=dtype)
        if self.topk is not None or self.dense is not None:
            # The live teacher's KD rows: `response_positions` of the teacher labels, mask order.
            counts = response_positions(batch["teacher"]["labels"]).sum(1).cpu()
            rows = self._rows(self.kd_offsets, index, counts, "KD-row (response-token)")
        if self.dense is not None:
            flat, dtype = self.dense
            kd_logits = flat[rows].to(device=device, dtype=dtype)
        if self.topk is not None:
            logprobs, ids, rest = self.topk
            # fp32 log-probs (the loss computes in fp32) and int64 ids, as `losses.teacher_topk`.
            kd_topk = losses.TeacherTopK(logprobs[rows].to(device=device, dtype=torch.float32),
                                         ids[rows].to(device=device, dtype=torch.int64),
                                         rest[rows].to(device=device))
        return ModelOutputs(kd_logits=kd_logits, hidden=hidden, logits=kd_logits, kd_topk=kd_topk)


# ----------------------------------------------------------------------------- building

class _Progress:
    """Log lines every 10% or 30 s: the build is visible in a piped log too."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = total, desc, 0
        self.start = self.last = time.perf_counter()
        self.every = max(total // 10, 1)

    def update(self, n: int) -> None:
        before, self.done = self.done, self.done + n
        now = time.perf_counter()
        if (self.done // self.every > before // self.every or now - self.last >= 30
                or self.done == self.total):
            self.last = now
            elapsed = now - self.start
            eta = elapsed / self.done * (self.total - self.done)
            log.info("%s: %d/%d examples, elapsed %.0fs, eta %.0fs", self.desc, self.done,
                     self.total, elapsed, eta)


def _to(batch, device):
    return torch.utils._pytree.tree_map(lambda t: t.to(device) if torch.is_tensor(t) else t, batch)


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    """(n + 1,) int64 run starts of n consecutive runs of `counts` rows."""
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets


def kd_row_counts(examples: list[dict]) -> torch.Tensor:
    """Per example, the KD rows a causal teacher gives it: its positions that predict a response
    token (`response_positions` of its teacher labels, as `CausalLM.forward` picks them)."""
    return torch.tensor([int(response_positions(torch.tensor([e["teacher"].labels])).sum())
                         for e in examples], dtype=torch.int64)


def write_store(out: Path, teacher: TaskModel, request: OutputRequest, data, *, batch_size: int,
                device: torch.device, precision) -> dict:
    """Run the teacher over the train split and write what `request` (a `stored_request`)
    names into `out`.

    Examples go longest first in batches of similar length (little padding, and the largest
    batch fails first if memory is short); rows land at their example's offsets. A causal LM's
    logits are reduced to `losses.teacher_topk` at the request's k and temperature (or, without
    a k, to log-softmax rows) right after the forward, a chunk of rows at a time, so no fp32
    (rows, V) array outlives its batch."""
    if any(v is not None for v in request.views):
        raise ValueError("the store keeps full states; widen the request with stored_request")
    causal_rows = request.logits and teacher.kind == "causal_lm"
    causal_topk = causal_rows and request.topk is not None
    causal_dense = causal_rows and request.topk is None
    data.setup()
    examples = data.splits["train"]
    if [e["index"] for e in examples] != list(range(len(examples))):
        raise StoreMismatchError("the train split's examples are not indexed 0..n-1")
    lengths = torch.tensor([len(e["teacher"].input_ids) for e in examples], dtype=torch.int64)
    offsets = _offsets(lengths)
    n_tokens = int(offsets[-1])
    np.asarray(offsets.numpy()).tofile(out / OFFSETS_FILE)

    files: dict[str, np.memmap] = {}
    meta = {"examples": len(examples), "tokens": n_tokens, "hidden": {}, "logits": None,
            "topk": None, "dense": None, "request": request_key(request),
            "store_dtype": str(STORE_DTYPE)}

    def sink(name: str, shape: tuple[int, ...], dtype=np.int16) -> np.memmap:
        if name not in files:  # bf16 as its bits in int16: numpy has no bfloat16
            files[name] = np.memmap(out / name, dtype=dtype, mode="w+", shape=shape)
        return files[name]

    def bits(t: torch.Tensor) -> np.ndarray:
        return bits_of(t).numpy()

    if causal_rows:
        kd_counts = kd_row_counts(examples)
        kd_offsets = _offsets(kd_counts)
        n_kd = int(kd_offsets[-1])
        np.asarray(kd_offsets.numpy()).tofile(out / KD_OFFSETS_FILE)
    if causal_dense:
        vocab = teacher.num_outputs
        meta["dense"] = {"rows": n_kd, "vocab": vocab, "offsets": KD_OFFSETS_FILE,
                         "file": DENSE_FILE, "dtype": "torch.float32"}
        if n_kd == 0:
            (out / DENSE_FILE).write_bytes(b"")
        else:
            sink(DENSE_FILE, (n_kd, vocab))
    if causal_topk:
        k = int(request.topk)
        meta["topk"] = {"k": k, "temperature": float(request.topk_temperature), "rows": n_kd,
                        "offsets": KD_OFFSETS_FILE, "files": dict(TOPK_FILES),
                        "dtypes": {"logprobs": "bfloat16", "ids": "int32", "rest": "float32"}}
        if teacher.num_outputs > np.iinfo(np.int32).max:
            raise ConfigError(f"the teacher's {teacher.num_outputs} vocabulary ids do not fit the "
                              "store's int32 top-k ids; use teacher_store=off")
        if n_kd == 0:  # no response token at all: empty files (np.memmap cannot map 0 bytes)
            for name in TOPK_FILES.values():
                (out / name).write_bytes(b"")
        else:
            sink(TOPK_FILES["logprobs"], (n_kd, k))
            sink(TOPK_FILES["ids"], (n_kd, k), np.int32)
            sink(TOPK_FILES["rest"], (n_kd,), np.float32)

    order = torch.argsort(lengths, descending=True, stable=True)
    progress = _Progress(len(examples), "teacher store")
    # As LiveTeacher asks it: eval mode (dropout off), no autograd, the training precision.
    teacher.to(device).eval()
    for chunk in order.split(batch_size):
        batch = _to(data.collate([examples[int(i)] for i in chunk]), device)
        top = dense = None
        with precision, torch.no_grad():
            answer = teacher(batch["teacher"], layers=request.layers)
            if causal_dense and answer.kd_logits.shape[0]:
                # Read back in the dtype the live teacher's logits have (bf16 under autocast).
                meta["dense"]["dtype"] = str(answer.kd_logits.dtype)
                dense = torch.cat([bits_of(F.log_softmax(rows.float(), dim=-1))
                                   for rows in answer.kd_logits.split(TOPK_CHUNK_ROWS)])
            if causal_topk and answer.kd_logits.shape[0]:
                # Row-wise, so computing it a chunk of rows at a time changes nothing.
                parts = [losses.teacher_topk(rows, k, request.topk_temperature)
                         for rows in answer.kd_logits.split(TOPK_CHUNK_ROWS)]
                top = losses.TeacherTopK(*(torch.cat(column) for column in zip(*parts, strict=True)))
        mask = batch["teacher"]["attention_mask"].bool()
        if answer.hidden:
            dest = _spans(offsets[chunk], mask.sum(1).cpu()).numpy()
            for layer, h in answer.hidden.items():
                name = f"hidden_{layer}.bin"
                meta["hidden"][str(layer)] = {"file": name, "width": h.shape[-1],
                                              "dtype": str(h.dtype)}
                sink(name, (n_tokens, h.shape[-1]))[dest] = bits(h[mask])
        if causal_rows:
            counts = response_positions(batch["teacher"]["labels"]).sum(1).cpu()
            if (not torch.equal(counts, kd_counts[chunk])
                    or int(counts.sum()) != answer.kd_logits.shape[0]):
                raise StoreMismatchError("the teacher's KD rows of a batch differ from its examples' "
                                         "response tokens (the collated labels changed them)")
            dest = _spans(kd_offsets[chunk], counts).numpy()
            if dense is not None:
                files[DENSE_FILE][dest] = dense.numpy()
            if top is not None:
                files[TOPK_FILES["logprobs"]][dest] = bits(top.logprobs)
                files[TOPK_FILES["ids"]][dest] = top.ids.to(torch.int32).cpu().numpy()
                files[TOPK_FILES["rest"]][dest] = top.rest_logprob.float().cpu().numpy()
        elif request.logits:
            if answer.kd_logits.shape[0] != len(chunk):
                raise ConfigError("the store holds one logit row per example (class logits); "
                                  "this teacher answers per token")
            meta["logits"] = {"file": "logits.bin", "width": answer.kd_logits.shape[-1],
                              "dtype": str(answer.kd_logits.dtype)}
            sink("logits.bin", (len(examples), answer.kd_logits.shape[-1]))[chunk.numpy()] = bits(
                answer.kd_logits)
        progress.update(len(chunk))
    for memmap in files.values():
        memmap.flush()
    atomic_write_json(out / META_FILE, meta)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    summary = {"examples": len(examples), "tokens": n_tokens, "size_mb": round(size / 2**20, 2)}
    if causal_rows:
        summary |= {"kd_rows": n_kd, "topk": k if causal_topk else None}
    return summary


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """A CPU int16 view of `t` in the store dtype (bf16 bits: numpy has no bfloat16)."""
    return t.detach().to(STORE_DTYPE).cpu().view(torch.int16)


@dataclass
class StoreHandle:
    """A run's teacher outputs and what results.json says about them."""

    outputs: StoredTeacher | None
    info: dict = field(default_factory=dict)


def teacher_store(setting: str, strategy, teacher: TaskModel | None, data, *, cache_dir: str | Path,
                  teacher_fingerprint: str, trainer_cfg, device: torch.device, precision,
                  batch_size: int = 64) -> StoreHandle:
    """The store for this run (built on a miss), or `outputs=None` (read the live teacher) with
    the reason. `precision` is the autocast context the training step runs the teacher in."""
    enabled, reason = store_decision(setting, strategy, teacher)
    if not enabled:
        log.info("teacher store: off (%s)", reason)
        return StoreHandle(None, {"enabled": False, "reason": reason})
    request = stored_request(strategy, teacher)
    too_big = dense_size_problem(request, teacher, data)
    if too_big:
        log.info("teacher store: off (%s)", too_big)
        return StoreHandle(None, {"enabled": False, "reason": too_big})
    key_obj = {"teacher": teacher_fingerprint, "task": data.task.fingerprint(),
               "request": request_key(request), "precision": precision_key(trainer_cfg)}
    # Responses swapped in at setup (seqkd: the teacher's own answers) are other training data.
    swapped = getattr(data, "responses", {}).get("train")
    if swapped:
        key_obj["responses"] = content_hash({str(i): text for i, text in sorted(swapped.items())})

    def build(out: Path) -> dict:
        return write_store(out, teacher, request, data, batch_size=batch_size, device=device,
                           precision=precision)

    def load(path: Path) -> StoredTeacher:
        return StoredTeacher(path, layers=strategy.teacher_request().layers)

    stored, entry = get_or_build(cache_dir, STORE_KIND, key_obj, build, load,
                                 version=STORE_VERSION, full_verify=True, desc="teacher store")
    info = describe(entry) | {"enabled": True, "reason": reason}
    log.info("teacher store: %s %s (%.1f MB)", "cache hit" if entry.cache_hit else "built",
             entry.path, info["size_mb"])
    return StoreHandle(stored, info)


def dense_size_problem(request: OutputRequest, teacher: TaskModel, data) -> str | None:
    """Why a causal LM's whole-vocabulary rows would not be stored (over DENSE_MAX_GIB), or None."""
    if not (request.logits and teacher.kind == "causal_lm" and request.topk is None):
        return None
    data.setup()
    rows = int(kd_row_counts(data.splits["train"]).sum())
    gib = rows * teacher.num_outputs * STORE_DTYPE.itemsize / 2**30
    if gib <= DENSE_MAX_GIB:
        return None
    return (f"the teacher's whole-vocabulary rows for {rows} response tokens would take {gib:.1f} "
            f"GiB, over the store's {DENSE_MAX_GIB:g} GiB for them, so logit KD reads the live "
            "teacher; set strategy.logit_topk=K (e.g. 128) to store its top-k instead")


def describe(entry: EntryInfo) -> dict:
    manifest = read_manifest(entry.path) or {}
    return entry.as_dict() | {"size_mb": round(manifest.get("total_size", 0) / 2**20, 2),
                              "build_seconds": manifest.get("build_seconds")}
