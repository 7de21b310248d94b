"""Where the time goes: phases and matmul work of the main workloads, against the machine's floor.

    python bench/profile_speed.py --threads 2          # idle machine -> bench/results/profile.json

Floor: the model's raw speed on this machine in tokens/s (a padded 16 x 32 batch: forward without and
with the vocabulary projection; forward + backward to the inputs, as the target optimisation runs) and
the fp32 matrix-multiply rate at the shapes these workloads use. Workloads (statistics and context
templates cached before, as in a warm run): one ROME edit, one ROME+SADR edit, one MEMIT group
(the requests optimised together: 42 at the SmolLM2 preset's 256 rows), the evaluation of one merged
CounterFact case (scoring; fluency decoding), and one 64-text sampling batch of the ``model`` corpus.
Each runs once under ``torch.profiler`` (FLOPs of every matmul counted; the MEMIT group without it,
see ``measure``) with wall-clock timers around the functions that make its phases (a phase's time
includes the phases inside it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from attnedit import __version__
from attnedit.core.data import load_cases
from attnedit.core.models import load_model
from attnedit.editing import covariance
from attnedit.editing.base import method_templates, stats_spec
from attnedit.editing.registry import make_editor
from attnedit.evaluation.evaluator import EvalConfig, Evaluator

MERGED = "../shared/data/sadr_merged_counterfact.json"
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
# the functions whose wall time makes the phases (module, attribute[, label])
PHASES = [
    ("attnedit.editing.base", "method_templates", "context templates"),
    ("attnedit.editing.covariance", "second_moments_of", "statistics"),
    ("attnedit.editing.optimise", "optimise_targets", "target optimisation"),
    ("attnedit.editing.frozen_below.FrozenBelow", "__init__", "  prefix cache + lower blocks (once)"),
    ("attnedit.editing.frozen_below.FrozenBelow", "forward", "  optimisation forwards"),
    ("attnedit.editing.solvers", "read_at_fact_token", "keys at the fact token"),
    ("attnedit.editing.solvers", "rank_one_update", "rank-one solve"),
    ("attnedit.editing.methods.memit.Memit", "update_layers", "least-squares layer loop"),
    ("attnedit.evaluation.evaluator.Evaluator", "score", "scoring (score_targets)"),
    ("attnedit.evaluation.evaluator.Evaluator", "add_fluency", "fluency decoding"),
    ("attnedit.evaluation.evaluator.Evaluator", "_perplexity", "corpus perplexity"),
]


class Phases:
    """Wall-clock time of the functions in ``PHASES``, patched wherever attnedit modules bind them."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._undo: list[Callable[[], None]] = []

    def _wrap(self, fn: Callable, label: str) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1

        return timed

    @contextlib.contextmanager
    def installed(self) -> Iterator[Phases]:
        for where, attr, label in PHASES:
            parts = where.split(".")
            for cut in range(len(parts), 0, -1):
                module_name = ".".join(parts[:cut])
                if module_name in sys.modules:
                    break
            target = sys.modules[module_name]
            for name in parts[cut:]:
                target = getattr(target, name)
            original = getattr(target, attr)
            wrapped = self._wrap(original, label)
            holders = [target]
            if isinstance(target, type(sys)):  # a module function: rebind it in every attnedit module
                holders += [
                    m
                    for n, m in list(sys.modules.items())
                    if n.startswith("attnedit") and getattr(m, attr, None) is original
                ]
            for holder in dict.fromkeys(holders):
                setattr(holder, attr, wrapped)
                self._undo.append(functools.partial(setattr, holder, attr, original))
        try:
            yield self
        finally:
            for undo in reversed(self._undo):
                undo()
            self._undo.clear()


def measure(name: str, fn: Callable[[], object], peak_gflops: float, profiled: bool = True) -> dict:
    """One run of ``fn`` under the phase timers and (``profiled``) the profiler: wall, phases, matmul
    share and FLOPs. The profiler's records of a MEMIT group's 20 steps over 250 rows exhaust 24 GiB,
    so that workload is timed by phase only."""
    phases = Phases()
    recorder = (
        profile(activities=[ProfilerActivity.CPU], with_flops=True) if profiled else contextlib.nullcontext()
    )
    with phases.installed(), recorder as prof:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    if not profiled:
        row = {"wall_seconds": round(wall, 3), "phases": {k: round(v, 3) for k, v in phases.seconds.items()}}
        print(f"{name}: {json.dumps(row)}", flush=True)
        return row
    events = prof.key_averages()
    mm_us = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    total_us = sum(e.self_cpu_time_total for e in events)
    flops = sum(e.flops or 0 for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]
    row = {
        "wall_seconds": round(wall, 3),
        "phases": {k: round(v, 3) for k, v in phases.seconds.items()},
        "phase_calls": dict(phases.calls),
        "matmul_share_of_op_time": round(mm_us / max(total_us, 1), 3),
        "gflop": round(flops / 1e9, 2),
        "achieved_gflops": round(flops / 1e9 / wall, 1),
        "floor_seconds_at_peak_matmul": round(flops / 1e9 / peak_gflops, 3),
        "top_ops": {e.key: round(e.self_cpu_time_total / 1e6, 3) for e in top},
    }
    print(f"{name}: {json.dumps(row)}", flush=True)
    return row


def floor(bundle, reps: int = 5) -> dict:
    """Raw tokens/s of a padded 16 x 32 batch, and the fp32 matmul rate at the workloads' shapes."""
    model, base = bundle.model, bundle.model.base_model
    ids = torch.randint(100, 1000, (16, 32))
    out: dict = {}

    def rate(fn: Callable[[], object]) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return round(reps * ids.numel() / (time.perf_counter() - start), 1)

    with torch.inference_mode():
        out["forward_tokens_per_s_no_logits"] = rate(lambda: base(input_ids=ids))
        out["forward_tokens_per_s_full_logits"] = rate(lambda: model(input_ids=ids))
    embed = model.get_input_embeddings()

    def fwd_bwd() -> None:
        x = embed(ids).detach().requires_grad_(True)
        base(inputs_embeds=x).last_hidden_state.square().mean().backward()

    out["forward_backward_tokens_per_s_no_logits"] = rate(fwd_bwd)
    h, f = bundle.adapter.hidden_size, bundle.model.config.intermediate_size
    mm = {}
    for m, k, n in ((512, h, f), (88, h, f), (88, f, h), (64, h, model.config.vocab_size)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        mm[f"{m}x{k}x{n}"] = round(2 * m * k * n * 10 / (time.perf_counter() - start) / 1e9, 1)
    out["fp32_matmul_gflops"] = mm
    out["peak_gflops"] = max(mm.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/profile.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_model()
    cases = load_cases(MERGED).cases
    result: dict = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "versions": {"torch": torch.__version__, "attnedit": __version__},
        "command": f"python bench/profile_speed.py --threads {args.threads}",
    }
    result["floor"] = floor(bundle)
    peak = result["floor"]["peak_gflops"]
    print(json.dumps(result["floor"]), flush=True)

    rome, sadr, memit = (make_editor(m, bundle) for m in ("rome", "rome+sadr", "memit"))
    with rome.apply(bundle, [cases[0]]):  # templates and statistics cached before timing
        pass
    memit.apply(bundle, [cases[0]]).revert()
    work: dict = {}
    work["rome_edit"] = measure("rome", lambda: rome.apply(bundle, [cases[1]]).revert(), peak)
    work["rome_sadr_edit"] = measure("rome+sadr", lambda: sadr.apply(bundle, [cases[1]]).revert(), peak)
    per_request = len(method_templates(bundle, memit.params)) + 1  # templates + the KL prompt
    group = cases[2 : 2 + memit.params.max_rows // per_request]
    work["memit_group"] = measure(
        f"memit x{len(group)}", lambda: memit.apply(bundle, group).revert(), peak, profiled=False
    )
    work["memit_group"]["requests"] = len(group)
    evaluator = Evaluator(bundle, EvalConfig(fluency=True))
    evaluator.evaluate(cases[0])
    work["eval_case_scoring"] = measure("scoring", lambda: evaluator.score(cases[1]), peak)
    record = evaluator.score(cases[1])
    work["eval_case_fluency"] = measure("fluency", lambda: evaluator.add_fluency([cases[1]], [record]), peak)
    spec = stats_spec(rome.params)
    work["sampling_batch_64"] = measure(
        "sampling", lambda: covariance.generate_chunk(bundle, spec, 0, covariance.SAMPLING_CHUNK), peak
    )
    result["workloads"] = work
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
