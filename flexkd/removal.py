"""`stage=removal` (issue #9): the teacher's task metric with probe-ranked dims removed.

No training. The teacher (fine-tuned and cached as for a train run) is probed exactly as
strategy=flexkd probes it (same cache entry), then scored on the task's test split with its
top-m, bottom-m and random-m dims of the probed layer removed (set to zero or to their mean
over the probe data), for m on a grid up to d_T/2. With `strategy.selection=directions` the
removed things are eigen-directions of the probe's gradient covariance, projected out.

Efficiency: per test batch the probed layer's state is computed once (a forward hook); for
each removal only what lies above that layer runs again: the blocks below it are replaced for
that call by stand-ins that return the edited state (`StateSite.replay`).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from flexkd.errors import ConfigError
from flexkd.models import TaskModel, final_norm, transformer_blocks, uses_label_words

log = logging.getLogger(__name__)

FILLS = ("zero", "mean")
KINDS = ("top", "bottom", "random")
AUTO_GRID_SHARES = (0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


def auto_grid(d: int) -> list[int]:
    """[0, d/64, d/32, d/16, d/8, d/4, d/2], rounded, without repeats."""
    return sorted({round(d * share) for share in AUTO_GRID_SHARES})


def resolve_grid(grid, d: int) -> list[int]:
    """The grid of m values: `removal.grid` (a list) or the automatic one (null)."""
    if grid is None:
        return auto_grid(d)
    bad = [m for m in grid if not 0 <= int(m) <= d]
    if bad:
        raise ConfigError(f"removal.grid={list(grid)}: {bad[0]} is not in 0..d_T={d} (the teacher "
                          "width); use values up to d_T, or removal.grid=null for the automatic grid")
    return sorted({int(m) for m in grid})


# ----------------------------------------------------------------------------- the state site

def _split_output(output) -> tuple[torch.Tensor, Callable[[torch.Tensor], object]]:
    """A block's output -> (its hidden state, a function that rebuilds the output around
    another state). Blocks return a tensor (BERT, Llama in transformers 5) or a tuple (MPNet)."""
    if isinstance(output, torch.Tensor):
        return output, lambda state: state
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        rest = tuple(output[1:])
        return output[0], lambda state: (state, *rest)
    raise ConfigError(f"stage=removal: a transformer block returned {type(output).__name__}; only "
                      "blocks that return a tensor or a tuple starting with one are supported")


class StateSite:
    """The teacher's hidden state at one layer (HF `hidden_states[layer]`): read it, edit it in a
    full forward, or replay the model above it from a given state.

    Where it lives: layer 0 is the input of the first block; the last layer of a decoder read
    after its final norm (`final_norm_state: post`) is that norm's output; any other layer L
    is the output of block L-1. Works for any backbone whose blocks form one ModuleList
    (`models.transformer_blocks`): BERT/MPNet encoders and Llama-family decoders.
    """

    def __init__(self, model: TaskModel, layer: int):
        self.model = model
        self.layer = model.layer_index(layer)
        self.blocks = transformer_blocks(model.backbone)
        n = model.num_layers
        norm = final_norm(model.backbone)
        self.norm = norm if (self.layer == n and model.final_norm_state == "post"
                             and norm is not None) else None
        # Blocks whose work a replay skips: all those below the site.
        self.below = n if self.norm is not None else self.layer
        self._rebuild = None  # how the last skipped block's output is shaped

    def _module(self):
        return self.norm if self.norm is not None else self.blocks[self.layer - 1]

    @contextlib.contextmanager
    def hooked(self, fn: Callable[[torch.Tensor], torch.Tensor | None]):
        """Within the block, every forward calls fn(state); a tensor it returns replaces the state."""
        if self.layer == 0:
            def pre(module, args, kwargs):
                state = args[0] if args else kwargs["hidden_states"]
                new = fn(state)
                if new is None:
                    return None
                if args:
                    return (new, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": new}

            handle = self.blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
        else:
            def post(module, args, output):
                state, rebuild = _split_output(output)
                new = fn(state)
                return None if new is None else rebuild(new)

            handle = self._module().register_forward_hook(post)
        try:
            yield
        finally:
            handle.remove()

    def capture(self, inputs: dict):
        """One full forward: (ModelOutputs, the state at the site)."""
        kept = {}

        def keep(state):
            kept["state"] = state
            return None

        def shape(module, args, output):
            self._rebuild = _split_output(output)[1]

        handles = [self.blocks[self.below - 1].register_forward_hook(shape)] if self.below else []
        try:
            with self.hooked(keep):
                out = self.model(inputs)
        finally:
            for h in handles:
                h.remove()
        return out, kept["state"]

    def replay(self, inputs: dict, state: torch.Tensor):
        """The model's outputs on `inputs` with `state` at the site, running only what is above
        it (embeddings, attention masks and position tables are recomputed: they are cheap).
        `capture` must have run once on this model (it learns the blocks' output shape)."""
        if self.below == 0:  # layer 0: nothing below but the embeddings
            with self.hooked(lambda _: state):
                return self.model(inputs)
        if self._rebuild is None:
            raise RuntimeError("StateSite.replay before capture")
        stand_in = self._rebuild(state)
        patched = list(self.blocks[: self.below]) + ([self.norm] if self.norm is not None else [])
        saved = [m.__dict__.get("forward") for m in patched]
        try:
            for m in patched:
                # An instance attribute shadows the class's forward; module hooks (the output
                # recorders of transformers) still run, so hidden_states keep their length.
                m.forward = (lambda *a, **k: state) if m is self.norm else (lambda *a, **k: stand_in)
            return self.model(inputs)
        finally:
            for m, old in zip(patched, saved, strict=True):
                if old is None:
                    del m.forward
                else:
                    m.forward = old


# ----------------------------------------------------------------------------- removals

@dataclass(frozen=True)
class Removal:
    """Remove `m` coordinates (`dims`) or directions (orthonormal columns of `basis`)."""

    kind: str
    m: int
    draw: int | None = None
    dims: torch.Tensor | None = None
    basis: torch.Tensor | None = None

    def apply(self, h: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """h with the removed part replaced by fill's: coordinates set to fill[i]; directions
        h - ((h - fill) U) U^T, the component along U set to fill's."""
        if self.m == 0:
            return h
        if self.dims is not None:
            out = h.clone()
            out[..., self.dims] = fill[self.dims].to(h.dtype)
            return out
        u = self.basis.to(h.device, torch.float32)
        centred = h.float() - fill.to(h.device, torch.float32)
        return (h.float() - (centred @ u) @ u.T).to(h.dtype)


def removals(order: torch.Tensor, grid: list[int], draws: int, seed: int,
             basis: torch.Tensor | None = None) -> list[Removal]:
    """Top-m, bottom-m and random-m removals for each m of the grid (m=0 once, shared).

    `order`: all d items by decreasing score; `basis` (d, d): the directions, column i for
    item i (None: items are coordinates). Random draw r is a seeded permutation whose first
    m items are removed, so the random sets grow with m."""
    d = order.numel()
    perms = [torch.randperm(d, generator=torch.Generator().manual_seed(seed * 1000 + r))
             for r in range(draws)]

    def make(kind, m, items, draw=None):
        if basis is None:
            return Removal(kind, m, draw, dims=items.clone())
        return Removal(kind, m, draw, basis=basis[:, items].contiguous())

    out = [Removal("none", 0)]
    for m in grid:
        if m == 0:
            continue
        out.append(make("top", m, order[:m]))
        out.append(make("bottom", m, order[d - m:]))
        out += [make("random", m, perm[:m], r) for r, perm in enumerate(perms)]
    return out


# ----------------------------------------------------------------------------- scoring

def predictions(model: TaskModel, out, inputs: dict, label_ids: list[int] | None):
    """(pred, gold) class indices of one batch (a head's argmax, or label-word multiple choice)."""
    from flexkd.evaluation.harness_metrics import label_word_predictions

    if model.kind == "classifier":
        return out.logits.argmax(-1), inputs["labels"]
    return label_word_predictions(out.kd_logits, inputs["labels"], label_ids)


@torch.no_grad()
def probe_mean(site: StateSite, loader, device) -> torch.Tensor:
    """(d,) mean of the state over the valid tokens of the probe data (fill=mean)."""
    total, count = None, 0
    for batch in loader:
        inputs = {k: v.to(device) for k, v in batch["teacher"].items()}
        _, h = site.capture(inputs)
        mask = inputs["attention_mask"].bool()
        rows = h[mask].double()
        total = rows.sum(0) if total is None else total + rows.sum(0)
        count += rows.shape[0]
    return (total / max(count, 1)).float()


def _passes(loader, plan: list[Removal], device):
    """(inputs, None) for a batch's full forward, then (inputs, i) for each removal i."""
    for batch in loader:
        inputs = {k: v.to(device) for k, v in batch["teacher"].items()}
        yield inputs, None
        for i in range(len(plan)):
            yield inputs, i


@torch.no_grad()
def measure(site: StateSite, loader, plan: list[Removal], fill: torch.Tensor, device,
            label_ids: list[int] | None = None, desc: str = "removal (forward passes)") -> dict:
    """Per removal (by position in `plan`) the (pred, gold) over the loader, plus the
    unablated full forward's under "baseline". Progress counts passes (a full forward or a
    replay), so a long batch at a middle layer still logs its lines."""
    from flexkd.progress import progress

    model = site.model
    was_training = model.training
    model.eval()
    preds = {i: [] for i in range(len(plan))} | {"baseline": []}
    golds = []
    fill = fill.to(device)
    try:
        for inputs, i in progress(_passes(loader, plan, device), desc,
                                  total=len(loader) * (len(plan) + 1)):
            if i is None:
                out, h = site.capture(inputs)
                pred, gold = predictions(model, out, inputs, label_ids)
                preds["baseline"].append(pred.cpu())
                golds.append(gold.cpu())
                continue
            replayed = site.replay(inputs, plan[i].apply(h, fill))
            preds[i].append(predictions(model, replayed, inputs, label_ids)[0].cpu())
    finally:
        model.train(was_training)
    gold = torch.cat(golds)
    return {key: (torch.cat(p), gold) for key, p in preds.items()}


def curves(plan: list[Removal], scored: dict, grid: list[int], metric: Callable) -> dict:
    """results.json's removal curves: baseline, top/bottom per m, random per m and draw."""
    value = {i: metric(*scored[i]) for i in range(len(plan))}
    zero = next(value[i] for i, r in enumerate(plan) if r.m == 0)
    pick = {(r.kind, r.m, r.draw): value[i] for i, r in enumerate(plan)}
    draws = sorted({r.draw for r in plan if r.kind == "random"})
    top = [zero if m == 0 else pick[("top", m, None)] for m in grid]
    bottom = [zero if m == 0 else pick[("bottom", m, None)] for m in grid]
    random = [[zero] * max(len(draws), 1) if m == 0 else [pick[("random", m, r)] for r in draws]
              for m in grid]
    return {"m": grid, "baseline": metric(*scored["baseline"]), "top": top, "bottom": bottom,
            "random": random, "random_mean": [statistics.fmean(v) for v in random],
            "random_std": [statistics.stdev(v) if len(v) > 1 else 0.0 for v in random]}


# ----------------------------------------------------------------------------- the probe

def probe_config(strategy, teacher: TaskModel, student_width: int | None, seed: int):
    """The ProbeConfig strategy=flexkd builds in its setup (flexkd.strategies.flexkd), so the
    probe cache entry is shared with train runs. With `selection=directions` the full basis
    (k = d_T) is kept instead: bottom-m directions need every eigenvector."""
    from flexkd.importance import ProbeConfig

    if len(strategy.layer_pairs) != 1:
        raise ConfigError(f"stage=removal probes one layer, but strategy.layer_pairs="
                          f"{[list(p) for p in strategy.layer_pairs]} has {len(strategy.layer_pairs)}; "
                          "set strategy.layer_pairs=[[-1,<teacher layer>]]")
    d_t = teacher.hidden_size
    k = min(strategy.k or student_width or d_t, d_t)
    if strategy.selection == "directions":
        k = d_t
    return ProbeConfig(layer=teacher.layer_index(strategy.layer_pairs[0][1]), score=strategy.score,
                       selection=strategy.selection, target=strategy.target, k=k,
                       examples=strategy.probe_examples, batch_size=strategy.probe_batch_size, seed=seed)


def ranking(probe) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(order of all d items by decreasing score, the (d, d) direction basis or None)."""
    from flexkd.importance import top_k

    if probe.selection.dim() == 2:  # directions: columns already by decreasing eigenvalue
        basis = probe.selection.float()
        return torch.arange(basis.shape[1]), basis
    return top_k(probe.scores.float(), probe.scores.numel()), None


# ----------------------------------------------------------------------------- the stage

def run_removal(cfg: DictConfig) -> dict:
    """`stage=removal`: results.json with the removal curves; see the module docstring."""
    from flexkd.data.tasks import TaskSpec
    from flexkd.evaluation.evaluate import single_token_label_ids
    from flexkd.evaluation.harness_metrics import classification_metrics
    from flexkd.importance import cached_probe
    from flexkd.model_info import ModelInfo
    from flexkd.pipeline import RunContext, data_module, load_tokenizers, report
    from flexkd.strategies import build_strategy
    from flexkd.teacher import prepare_teacher
    from flexkd.validation import validate_config

    ctx = RunContext.create(cfg)
    settings = OmegaConf.to_container(cfg.removal, resolve=True)
    with ctx.timings.stage("assets"):
        validate_config(cfg, ctx.resolve)
        task = TaskSpec.from_config(cfg.task, ctx.resolve)
        # validate_config checked the task (classification) and the strategy (Flex-KD).
        strategy_cfg = OmegaConf.to_container(cfg.strategy, resolve=True)
        strategy = build_strategy(strategy_cfg)
        student_tok, teacher_tok = load_tokenizers(cfg, ctx.resolve)
        label_words = uses_label_words(cfg.pair)
        student_spec = OmegaConf.to_container(cfg.pair.student, resolve=True)
        student_width = ModelInfo.from_spec("student", student_spec,
                                            lambda key, s: ctx.resolve(str(s))).width
    with ctx.timings.stage("teacher"):
        teacher = prepare_teacher(cfg.pair.teacher, cfg.teacher_finetune, cfg.trainer, task,
                                  teacher_tok, ctx.cache_dir, ctx.resolve,
                                  eval_batch_size=cfg.data.eval_batch_size, label_words=label_words)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = data_module(cfg, task, student_tok, teacher_tok, label_words)
    model = teacher.model.to(ctx.device)
    d = model.hidden_size
    grid = resolve_grid(settings.get("grid"), d)
    probe_cfg = probe_config(strategy, model, student_width, int(cfg.seed))
    with ctx.timings.stage("probe"), ctx.precision():
        probe = cached_probe(model, data.probe_dataloader(probe_cfg.examples, probe_cfg.batch_size),
                             probe_cfg, ctx.cache_dir, teacher.fingerprint, task.fingerprint())
    site = StateSite(model, probe_cfg.layer)
    fill = torch.zeros(d)
    if settings["fill"] == "mean":
        with ctx.timings.stage("fill_mean"), ctx.precision():
            fill = probe_mean(site, data.probe_dataloader(probe_cfg.examples, probe_cfg.batch_size),
                              ctx.device)
    order, basis = ranking(probe)
    plan = removals(order, grid, int(settings["random_draws"]), int(cfg.seed), basis)
    label_ids = single_token_label_ids(model, teacher_tok, task)
    if model.kind == "causal_lm" and not label_ids:
        raise ConfigError(f"stage=removal scores a label-word teacher by its one-token label words; "
                          f"those of task {task.name} are not single distinct tokens")
    classes = model.num_outputs if model.kind == "classifier" else len(label_ids)
    main = cfg.task.main_metric

    def metric(pred, gold):
        return classification_metrics(pred, gold, classes)[main]

    log.info("removal: %d masks x %d test examples at layer %d (%s, fill=%s), m in %s",
             len(plan), len(data.splits["test"]), site.layer, probe_cfg.selection,
             settings["fill"], grid)
    with ctx.timings.stage("removal"), ctx.precision():
        scored = measure(site, data.test_dataloader(), plan, fill, ctx.device, label_ids)
    removal = {"layer": site.layer, "score": probe_cfg.score, "selection": probe_cfg.selection,
               "fill": settings["fill"], "d": d, "random_draws": int(settings["random_draws"]),
               # the cached teacher's own test score, which the baseline reproduces
               "teacher_test": teacher.metrics.get("test", {}).get(main),
               **curves(plan, scored, grid, metric)}
    baseline = classification_metrics(*scored["baseline"], classes)
    return report(ctx, {
        "stage": "removal", "pair": cfg.pair.name, "task": task.name, "strategy": strategy_cfg["name"],
        "seed": int(cfg.seed), "main_metric": main,
        "metrics": {"teacher": baseline}, "removal": removal,
        "probe": {"probes": [probe.diagnostics()]}, "teacher": teacher.info,
    })
