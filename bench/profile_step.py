"""Where the time of one training step goes: a per-stage breakdown at box 64 and 128.

Stages are found by wrapping the model's submodules (and the image-formation function) in
``torch.profiler.record_function`` scopes from the outside, so the same script profiles this working tree
and an older commit (``--baseline REF``) whose code carries no annotations of its own. Scopes written in
the code itself (``cf:...``) are picked up too. Every profiled op's *self* CPU time is charged to

* ``forward/<stage>``: the innermost stage scope it ran in;
* ``backward/<stage>``: its autograd node's forward op's stage (matched by the autograd sequence number);
* ``recompute/<stage>``: forward ops that ran again inside the backward (activation checkpointing).

Data reading (incl. Fourier crop) and the optimiser step are timed with wall clocks around their calls.
The profiler adds overhead, so the unprofiled wall time of the same step is reported beside it and each
stage's share is the share of profiled time.

    python bench/profile_step.py                          # this tree, box 64 and 128
    python bench/profile_step.py --baseline e2296ed       # the same for that commit, side by side

Writes ``bench/results/profile_step.json`` (and ``.md``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gitref  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# (attribute path on the model, stage); first match wins for nested scopes (innermost is charged)
MODULE_STAGES = [
    ("def_encoder", "encoders"), ("orient_encoder", "encoders"), ("token_head", "encoders"),
    ("decoder", "decoder"), ("grid", "hashgrid"), ("head.spatial", "spatial_mlp"), ("head.ffn", "ffn"),
    ("head", "point_attention"),
]
FUNCTION_STAGES = [("cryoformer.model", "corrupt", "shift_ctf_fft"), ("cryoformer.model", "rotated_points", "rotate")]


def _wrap(fn, name: str):
    from torch.profiler import record_function

    def wrapped(*a, **k):
        with record_function(f"cf:{name}"):
            return fn(*a, **k)
    return wrapped


def annotate(model) -> None:
    """Put a ``cf:<stage>`` scope around each known submodule and function, whatever the code version."""
    import importlib

    for path, stage in MODULE_STAGES:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            obj.forward = _wrap(obj.forward, stage)
    for mod_name, fn_name, stage in FUNCTION_STAGES:
        mod = importlib.import_module(mod_name)
        if hasattr(mod, fn_name):
            setattr(mod, fn_name, _wrap(getattr(mod, fn_name), stage))


# ops outside every module scope (and autograd nodes without a matched forward op), named by what they do
OP_STAGES = [("hashgridfunction", "hashgrid"), ("index_add", "scatter"), ("index_copy", "scatter"),
             ("index_put", "scatter"), ("grid_sampler", "project"), ("packedprojection", "project"),
             ("fft", "shift_ctf_fft")]


def _scope_of(ev) -> str | None:
    """Innermost ``cf:`` scope above an event."""
    e = ev
    while e is not None:
        if e.name.startswith("cf:"):
            return e.name[3:]
        e = e.cpu_parent
    return None


def _op_stage(ev, stop=None) -> str:
    e = ev
    while e is not None and e is not stop:
        for key, stage in OP_STAGES:
            if key in e.name.lower():
                return stage
        e = e.cpu_parent
    return "other"


def _backward_node(ev):
    e = ev
    while e is not None and not e.name.startswith("autograd::engine::evaluate_function"):
        e = e.cpu_parent
    return e


def _node_op(node_name: str) -> str:
    """``autograd::engine::evaluate_function: AddmmBackward0`` -> ``addmm``."""
    name = node_name.rsplit(":", 1)[-1].strip()
    return name.split("Backward")[0].lower()


def classify(events) -> dict[str, float]:
    """Self CPU seconds per ``phase/stage`` (see the module docstring)."""
    by_seq: dict[int, list] = defaultdict(list)
    for ev in events:
        if ev.sequence_nr >= 0 and _backward_node(ev) is None and not ev.name.startswith("cf:"):
            by_seq[ev.sequence_nr].append(ev)

    def forward_stage(node) -> str:
        # wrapper ops (aten::linear) carry the sequence number of the op that made the node (addmm):
        # prefer the event named like the node
        cands = by_seq.get(node.sequence_nr, [])
        op = _node_op(node.name)
        match = [e for e in cands if e.name.split("::")[-1].lstrip("_").lower() == op.lstrip("_")]
        ev = (match or cands or [None])[-1]
        stage = None if ev is None else (_scope_of(ev) or _op_stage(ev))
        return stage if stage and stage != "other" else _op_stage(node)

    out: dict[str, float] = defaultdict(float)
    for ev in events:
        t = ev.self_cpu_time_total * 1e-6
        node, scope = _backward_node(ev), _scope_of(ev)
        if node is None:
            out["forward/" + (scope or _op_stage(ev))] += t
        elif scope is not None:          # a scope under a backward node: forward code run again
            out["recompute/" + scope] += t
        else:
            out["backward/" + forward_stage(node)] += t
    return dict(out)


def prepare_model(model) -> dict:
    """Let a model that renders only where the molecule is (occupancy grid) use the simulated molecule's
    extent, as training would estimate it; older code has no such grid and renders the whole sphere."""
    if not hasattr(model, "occupancy"):
        return {"occupancy": None}
    from cryoformer.simulate import true_volume
    from cryoformer.train import TrainConfig

    vols = [true_volume(t, model.cfg.box) for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    tc = TrainConfig()
    frac = model.occupancy.set_from_volumes(vols, tc.occupancy_threshold, tc.occupancy_margin)
    return {"occupancy_fraction_of_sphere": frac}


def profile_child(box: int, batch: int, threads: int | None) -> dict:
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from cryoformer.data import ArraySource, ParticleData
    from cryoformer.model import CryoFormer
    from cryoformer.simulate import simulate
    from cryoformer.train import BatchReader, TrainConfig, estimate_data_scale, make_optimizer
    from cryoformer_ext.config import JobConfig

    model_config_for = gitref.job_setting("model_config_for")

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    sim = simulate(3 * batch, box, pixel_size_A=4.0 * 32 / box, snr=0.1, seed=0)
    data = ParticleData(ArraySource(sim.images), sim.pixel_size_A, sim.ctf, sim.rot, sim.shift_px)
    mcfg = model_config_for(data, JobConfig(train_box=box, batch_size=batch), estimate_data_scale(data, box))
    model = CryoFormer(mcfg).train()
    extra = prepare_model(model)
    if hasattr(model.head, "product_dtype"):  # as training sets it (bf16 products on CPUs that multiply bf16)
        from cryoformer.device import head_product_dtype

        model.head.product_dtype = head_product_dtype(torch.device("cpu"), TrainConfig().amp)
    opt = make_optimizer(model, TrainConfig())
    reader = BatchReader(data, box)
    annotate(model)

    # training passes its step number (the canonical renderer's sub-voxel offset: a jittered grid, so the
    # hash grid is evaluated afresh each step); without it the unjittered path with the kept corner plan
    # would be profiled, which training never runs. Older code has no such parameter.
    takes_step = "step" in inspect.signature(model.forward).parameters

    def step(idx, timers: dict | None = None):
        t0 = time.perf_counter()
        b = reader(idx)
        t1 = time.perf_counter()
        extra = {"step": int(idx[0]) // batch + 1} if takes_step else {}
        out = model(b["images"], b.get("ctf"), b.get("rot"), b.get("shift"), **extra)
        out["mse"].backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if timers is not None:
            timers.update(data_read_crop=t1 - t0, forward_backward=t2 - t1, optimizer=t3 - t2, total=t3 - t0)

    idx = [np.arange(i * batch, (i + 1) * batch) for i in range(3)]
    step(idx[0])                                   # warm-up (allocations, one-time setup)
    plain: dict = {}
    step(idx[1], plain)
    prof_t: dict = {}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(idx[2], prof_t)
    stages = classify(prof.events())
    fb = sum(stages.values())
    stages_s = {k: round(v, 4) for k, v in sorted(stages.items(), key=lambda kv: -kv[1])}
    return {
        "box": box, "batch_size": batch, "threads": torch.get_num_threads(),
        "unprofiled_step_s": plain, "profiled_step_s": prof_t,
        "forward_backward_profiled_cpu_s": round(fb, 4),
        "stages_self_cpu_s": stages_s,
        "stages_share": {k: round(v / fb, 4) for k, v in stages_s.items()},
        "images_per_s_unprofiled": batch / plain["total"], **extra,
    }


def run_children(code_root: Path | None, boxes: list[int], batch: int, threads: int | None) -> list[dict]:
    rows = []
    for box in boxes:
        cmd = [sys.executable, __file__, "--child", str(box), "--batch", str(batch)]
        if threads:
            cmd += ["--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=gitref.env_for(code_root))
        if proc.returncode:
            raise SystemExit(f"profiling box {box} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        rows[-1]["code"] = gitref.describe(code_root)
        print(f"[{rows[-1]['code']}] box {box}: {rows[-1]['images_per_s_unprofiled']:.2f} img/s; top stages: "
              + ", ".join(f"{k} {v:.0%}" for k, v in list(rows[-1]["stages_share"].items())[:6]), flush=True)
    return rows


def to_markdown(results: dict) -> str:
    lines = [f"# One training step, per stage ({results['date']})", "", f"`{results['command']}`", ""]
    for code, rows in results["runs"].items():
        for r in rows:
            lines += [f"## {code}, box {r['box']}, batch {r['batch_size']}, {r['threads']} threads: "
                      f"{r['images_per_s_unprofiled']:.2f} img/s unprofiled "
                      f"(step {r['unprofiled_step_s']['total']:.2f} s: data {r['unprofiled_step_s']['data_read_crop']:.3f}, "
                      f"fwd+bwd {r['unprofiled_step_s']['forward_backward']:.2f}, optimiser {r['unprofiled_step_s']['optimizer']:.3f})",
                      "", "| stage | self CPU s (profiled) | share |", "|---|---|---|"]
            lines += [f"| {k} | {v:.3f} | {r['stages_share'][k]:.1%} |" for k, v in r["stages_self_cpu_s"].items()]
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--boxes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--baseline", default=None, help="also profile this git ref (e.g. e2296ed)")
    p.add_argument("--out", default="profile_step", help="results file stem in bench/results/")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        print(json.dumps(profile_child(a.child, a.batch, a.threads)))
        return
    runs = {}
    if a.baseline:
        with gitref.checkout(a.baseline) as tree:
            runs[f"baseline {a.baseline}"] = run_children(tree, a.boxes, a.batch, a.threads)
    runs[f"current {gitref.describe(None)}"] = run_children(None, a.boxes, a.batch, a.threads)
    results = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
               "cpu_count": os.cpu_count(), "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{a.out}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{a.out}.md").write_text(to_markdown(results))
    print(f"wrote {RESULTS / (a.out + '.json')}")


if __name__ == "__main__":
    main()
