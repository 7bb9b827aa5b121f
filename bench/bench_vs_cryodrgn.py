"""Side by side with cryoDRGN on the same simulated heterogeneous data: quality against wall time.

Data: the project's simulator (:func:`cryoformer.simulate.simulate`), ``--states`` evenly spaced
conformations of the hinge motion (or ``continuous``), SNR ``--snr``, poses and CTF given, written as a
RELION 3.1 STAR + MRCS (:func:`cryoformer_ext.simulation_io.write_simulated`) for cryoFormer and as
cryoDRGN's ``pose.pkl`` ((rot (N,3,3), trans = shift_px / D)) and ``ctf.pkl`` ((N, 9): D, Apix, dfU, dfV,
dfAng, kV, Cs, Q0, phase) next to the same MRCS for cryoDRGN.

Training, one method at a time (each in its own process, ``--threads`` torch threads, peak RSS from
``/proc/<pid>/status`` VmHWM polled by this script):
* cryoDRGN: ``cryodrgn train_vae`` (zdim 8, encoder/decoder 3 x 256, ``--poses --ctf``, default data
  sign inversion: cryoDRGN's CTF is the negative of RELION's, so its default ``invert_data`` is right for
  RELION-convention images; with ``--uninvert-data`` its maps came out contrast-inverted, FSC-AUC < 0,
  ``--checkpoint 1`` so every epoch leaves ``weights.E.pkl`` + ``z.E.pkl``); epoch times from its
  "Epoch: ... Finished in" lines.
* cryoFormer: the ``cryoformer train`` path (``read_particles_star`` + the trainer of ``run_job``, same
  job defaults), the epoch checkpoint copied after every epoch; epoch times from its "epoch E done" lines.
Per-epoch checkpoints in one process (rather than restarting with ``--load`` / resume per epoch) keep
process start-up out of the epoch times; the wall-time axis is the cumulative epoch time.

Quality after every epoch (CryoBench style): for ``--eval-particles`` evenly spaced particles, the map at
that particle's latent (cryoDRGN: ``cryodrgn eval_vol --zfile``; cryoFormer:
``Reconstruction.load(ckpt).volumes(z)``), FSC against ``true_volume(t_i, D)`` of its conformation; mean
FSC-AUC and mean resolution (px) at FSC 0.5 and 0.143. Map axis order/handedness conventions may differ
between programs: the signed axis permutation (48 candidates) that best matches the truth is chosen
once per method on the last epoch's first map and recorded.

Writes ``bench/results/vs_cryodrgn[_quick].json`` / ``.md`` / ``.png``.

    python bench/bench_vs_cryodrgn.py --quick                 # smoke run: box 32, 500 particles, 2 epochs
    python bench/bench_vs_cryodrgn.py --box 64 --n 5000 --epochs 20
    python bench/bench_vs_cryodrgn.py --box 128 --n 5000 --epochs 20
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pickle
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
VENV = Path(__file__).resolve().parent / ".venv-cryodrgn"


# ---------------------------------------------------------------------------------------------------
# environment


def install_cryodrgn(venv: Path, torch_version: str, isolated: bool) -> None:
    """``python -m venv`` + ``pip install torch==X cryodrgn``. Without ``isolated`` the venv sees this
    interpreter's packages (the local CPU torch satisfies ``torch==X``; nothing is downloaded twice)."""
    if not (venv / "bin" / "python").exists():
        cmd = [sys.executable, "-m", "venv", str(venv)] + ([] if isolated else ["--system-site-packages"])
        subprocess.run(cmd, check=True)
    (venv / ".gitignore").write_text("*\n")  # keep the venv out of git
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    torch_req = [f"torch=={torch_version}"]
    if isolated:
        torch_req += ["--index-url", "https://download.pytorch.org/whl/cpu"]
    subprocess.run(pip + torch_req, check=True)
    subprocess.run(pip + ["cryodrgn"], check=True)


def cryodrgn_exe(venv: Path) -> str:
    exe = venv / "bin" / "cryodrgn"
    if not exe.exists():
        raise SystemExit(f"{exe} not found: run without --skip-install first")
    return str(exe)


# ---------------------------------------------------------------------------------------------------
# data


def make_dataset(out: Path, n: int, box: int, states: str, snr: float, seed: int) -> dict:
    from cryoformer.simulate import simulate
    from cryoformer_ext.simulation_io import write_simulated

    out.mkdir(parents=True, exist_ok=True)
    pixel = 4.0 * 64 / box  # same physical box (256 Å) at every D
    st = states if states == "continuous" else int(states)
    t0 = time.perf_counter()
    sim = simulate(n, box, pixel_size_A=pixel, snr=snr, states=st, seed=seed)
    write_simulated(sim, out)
    with open(out / "pose.pkl", "wb") as fh:
        pickle.dump((sim.rot.astype(np.float32), (sim.shift_px / box).astype(np.float32)), fh)
    c = sim.ctf
    ctf = np.stack([np.full(n, box), np.full(n, pixel), c.defocus_u_A, c.defocus_v_A, c.defocus_angle_deg,
                    c.voltage_kv, c.cs_mm, c.amp_contrast, c.phase_shift_deg], axis=1).astype(np.float32)
    with open(out / "ctf.pkl", "wb") as fh:
        pickle.dump(ctf, fh)
    np.save(out / "conformation.npy", sim.conformation)
    return {"n": n, "box": box, "pixel_size_A": pixel, "states": states, "snr": snr,
            "noise_sigma": sim.noise_sigma, "simulate_and_write_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------
# running with peak-RSS polling


def run_polled(cmd: list[str], log_path: Path, env: dict, timeout: float) -> dict:
    t0 = time.time()
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        hwm = 0
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as st:
                    for line in st:
                        if line.startswith("VmHWM"):
                            hwm = max(hwm, int(line.split()[1]))
            except OSError:
                pass
            if time.time() - t0 > timeout:
                proc.kill()
                raise RuntimeError(f"{cmd[:3]} ran past {timeout} s (log: {log_path})")
            time.sleep(0.2)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({proc.returncode}); log: {log_path}\n"
                           + log_path.read_text()[-3000:])
    return {"wall_s": time.time() - t0, "peak_rss_GB": hwm / 1024 ** 2}


def child_env(threads: int, extra_path: bool = True) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if extra_path:
        env["PYTHONPATH"] = str(REPO)
    return env


def _hms(s: str) -> float:
    h, m, sec = s.split(":")
    return int(h) * 3600 + int(m) * 60 + float(sec)


def train_cryodrgn(exe: str, data: Path, out: Path, epochs: int, threads: int, batch: int, seed: int,
                   timeout: float) -> dict:
    cmd = [exe, "train_vae", str(data / "particles.mrcs"), "--poses", str(data / "pose.pkl"),
           "--ctf", str(data / "ctf.pkl"), "--zdim", "8", "-n", str(epochs), "-o", str(out),
           "--enc-dim", "256", "--enc-layers", "3", "--dec-dim", "256", "--dec-layers", "3",
           "--checkpoint", "1", "--no-analysis", "-b", str(batch), "--seed", str(seed),
           "--max-threads", str(threads)]
    run = run_polled(cmd, out.with_suffix(".log"), child_env(threads, extra_path=False), timeout)
    text = out.with_suffix(".log").read_text()
    run["epoch_s"] = [_hms(m) for m in re.findall(r"Epoch: \d+ .*?Finished in (\d+:\d+:[\d.]+)", text)]
    ws = sorted(out.glob("weights.*.pkl"), key=lambda p: int(p.name.split(".")[1]))
    run["checkpoints"] = [{"weights": str(w), "z": str(w.with_name(w.name.replace("weights", "z")))} for w in ws]
    run["command"] = " ".join(cmd)
    return run


def train_cryoformer(data: Path, out: Path, epochs: int, threads: int, batch: int, seed: int,
                     timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child-cryoformer", str(data), str(out), "--epochs", str(epochs),
           "--threads", str(threads), "--batch", str(batch), "--seed", str(seed)]
    run = run_polled(cmd, out.with_suffix(".log"), child_env(threads), timeout)
    text = out.with_suffix(".log").read_text()
    run["epoch_s"] = [float(m) for m in re.findall(r"epoch \d+ done: .*? in ([\d.]+) s", text)]
    run["checkpoints"] = [{"weights": str(p)} for p in sorted(out.glob("epoch_*.pt"))]
    run["command"] = " ".join(cmd)
    return run


def child_cryoformer(data: Path, out: Path, epochs: int, threads: int, batch: int, seed: int) -> None:
    """``cryoformer train``'s training part, copying the checkpoint after every epoch."""
    import torch

    torch.set_num_threads(threads)
    from cryoformer.train import CHECKPOINT_NAME, TrainConfig, estimate_data_scale, train
    from cryoformer_ext.config import JobConfig
    from cryoformer_ext.job import model_config_for, training_box
    from cryoformer_ext.star_io import read_particles_star

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    star = read_particles_star(data / "particles.star", data)
    job = JobConfig(epochs=epochs, batch_size=batch, seed=seed, threads=threads)
    scale = estimate_data_scale(star.data, training_box(job, star.data.box), seed=seed)
    mcfg = model_config_for(star.data, job, scale)
    tcfg = TrainConfig(epochs=epochs, batch_size=batch, lr=job.lr, seed=seed, device="cpu", amp=job.amp)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
        m = re.match(r"epoch (\d+) done", msg)
        if m:
            shutil.copy(out / "checkpoints" / CHECKPOINT_NAME, out / f"epoch_{int(m.group(1)):03d}.pt")

    train(star.data, mcfg, tcfg, out / "checkpoints", log=log)


# ---------------------------------------------------------------------------------------------------
# quality


def _signed_perms() -> list[tuple[tuple[int, int, int], tuple[bool, bool, bool]]]:
    return [(p, f) for p in itertools.permutations(range(3)) for f in itertools.product([False, True], repeat=3)]


def _apply(vol: np.ndarray, tf) -> np.ndarray:
    perm, flips = tf
    v = np.transpose(vol, perm)
    for ax, fl in enumerate(flips):
        if fl:
            v = np.roll(np.flip(v, ax), 1, ax)  # flip about the centre voxel D//2
    return v


def choose_transform(vol: np.ndarray, truth: np.ndarray):
    from cryoformer.metrics import fsc, fsc_auc

    scores = [(fsc_auc(fsc(_apply(vol, tf), truth)), tf) for tf in _signed_perms()]
    best = max(scores, key=lambda s: s[0])
    ident = next(s for s in scores if s[1] == ((0, 1, 2), (False, False, False)))
    return best[1], {"transform": {"perm": list(best[1][0]), "flip": list(best[1][1])},
                     "auc_best": best[0], "auc_identity": ident[0]}


def quality(vols: np.ndarray, ts: np.ndarray, box: int, tf) -> dict:
    from cryoformer.metrics import fsc, fsc_auc, resolution_px
    from cryoformer.simulate import true_volume

    cache: dict[float, np.ndarray] = {}
    aucs, r05, r0143 = [], [], []
    for v, t in zip(vols, ts):
        key = round(float(t), 6)
        if key not in cache:
            cache[key] = true_volume(float(t), box)
        curve = fsc(_apply(v, tf), cache[key])
        aucs.append(fsc_auc(curve))
        r05.append(resolution_px(curve, 0.5))
        r0143.append(resolution_px(curve, 0.143))
    return {"fsc_auc": float(np.mean(aucs)), "res_px_fsc0.5": float(np.mean(r05)),
            "res_px_fsc0.143": float(np.mean(r0143))}


def cryodrgn_volumes(exe: str, ck: dict, idx: np.ndarray, work: Path, threads: int) -> np.ndarray:
    import mrcfile

    with open(ck["z"], "rb") as fh:
        z = pickle.load(fh)[idx]
    work.mkdir(parents=True, exist_ok=True)
    np.savetxt(work / "z.txt", z)
    cfg = Path(ck["weights"]).parent / "config.yaml"
    vdir = work / "vols"
    shutil.rmtree(vdir, ignore_errors=True)
    subprocess.run([exe, "eval_vol", ck["weights"], "-c", str(cfg), "--zfile", str(work / "z.txt"), "-o", str(vdir)],
                   check=True, env=child_env(threads, extra_path=False), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    files = sorted(vdir.glob("*.mrc"))
    if len(files) != len(idx):
        raise RuntimeError(f"eval_vol wrote {len(files)} maps for {len(idx)} latents in {vdir}")
    return np.stack([mrcfile.read(f).astype(np.float32) for f in files])


def cryoformer_volumes(ck: dict, data_dir: Path, idx: np.ndarray, box: int) -> np.ndarray:
    from cryoformer.data import ParticleData
    from cryoformer.infer import Reconstruction
    from cryoformer_ext.star_io import read_particles_star

    star = read_particles_star(data_dir / "particles.star", data_dir)
    d = star.data
    sub = ParticleData(_Subset(d.images, idx), d.pixel_size_A, None if d.ctf is None else _take_ctf(d.ctf, idx),
                       d.rot[idx], d.shift_px[idx])
    rec = Reconstruction.load(ck["weights"])
    z = rec.encode(sub)
    return rec.volumes(z, box)


class _Subset:
    def __init__(self, src, idx):
        self.src, self.idx = src, np.asarray(idx)

    @property
    def box(self) -> int:
        return self.src.box

    def __len__(self) -> int:
        return len(self.idx)

    def read(self, indices):
        return self.src.read(self.idx[np.asarray(indices)])


def _take_ctf(ctf, idx):
    from dataclasses import fields, replace

    return replace(ctf, **{f.name: getattr(ctf, f.name)[idx] for f in fields(ctf)})


# ---------------------------------------------------------------------------------------------------
# report


def write_report(res: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    d = res["dataset"]
    lines = [f"# cryoFormer vs cryoDRGN{' (SMOKE RUN, --quick: not the benchmark)' if res['quick'] else ''}", "",
             f"Data: {d['n']} particles, D={d['box']}, {d['pixel_size_A']:.2f} Å/px, states {d['states']}, "
             f"SNR {d['snr']}, poses + CTF given. {res['threads']} CPU thread(s); {res['date']}; `{res['command']}`", "",
             "| method | epoch | cum. train s | img/s | peak RSS GB | mean FSC-AUC | mean res @0.5 (px) | mean res @0.143 (px) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in res["methods"].items():
        for e in m["epochs"]:
            lines.append(f"| {name} | {e['epoch']} | {e['cum_train_s']:.1f} | {e['images_per_s']:.1f} | "
                         f"{m['peak_rss_GB']:.2f} | {e['fsc_auc']:.4f} | {e['res_px_fsc0.5']:.2f} | "
                         f"{e['res_px_fsc0.143']:.2f} |")
    lines.append("")
    for name, m in res["methods"].items():
        lines.append(f"* {name}: map orientation used for FSC {m['orientation']['transform']} "
                     f"(AUC {m['orientation']['auc_best']:.4f} vs {m['orientation']['auc_identity']:.4f} as written)")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for name, m in res["methods"].items():
            ax.plot([e["cum_train_s"] for e in m["epochs"]], [e["fsc_auc"] for e in m["epochs"]], "o-", label=name)
        ax.set_xlabel("cumulative training wall time (s)")
        ax.set_ylabel("mean FSC-AUC vs truth")
        ax.set_title(f"D={d['box']}, N={d['n']}" + (" (smoke run)" if res["quick"] else ""))
        ax.legend()
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=120)
    except Exception as err:  # noqa: BLE001 - the plot is optional
        print(f"no plot: {err}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--states", default="10", help="number of conformations along the motion, or 'continuous'")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--eval-particles", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: box 32, 500 particles, 2 epochs, 20 eval particles")
    p.add_argument("--skip-install", action="store_true", help="use the existing cryoDRGN venv")
    p.add_argument("--isolated-venv", action="store_true",
                   help="venv without system packages (downloads torch from the PyTorch CPU index)")
    p.add_argument("--torch", default="2.13.0")
    p.add_argument("--venv", type=Path, default=VENV)
    p.add_argument("--work", type=Path, default=Path("/tmp/cryoformer_vs_cryodrgn"))
    p.add_argument("--only", choices=["cryodrgn", "cryoformer"], default=None)
    p.add_argument("--timeout", type=float, default=24 * 3600, help="per training run (s)")
    p.add_argument("--child-cryoformer", nargs=2, type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child_cryoformer:
        child_cryoformer(*a.child_cryoformer, a.epochs, a.threads, a.batch, a.seed)
        return
    if a.quick:
        a.box, a.n, a.epochs, a.eval_particles = 32, 500, 2, 20
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch

    torch.set_num_threads(a.threads)

    methods = ["cryodrgn", "cryoformer"] if a.only is None else [a.only]
    exe = None
    if "cryodrgn" in methods:
        if not a.skip_install:
            install_cryodrgn(a.venv, a.torch, a.isolated_venv)
        exe = cryodrgn_exe(a.venv)
    work = a.work / f"D{a.box}_N{a.n}"
    shutil.rmtree(work, ignore_errors=True)
    data = work / "data"
    res = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "host": platform.node(), "cpu_count": os.cpu_count(), "threads": a.threads, "quick": a.quick,
           "dataset": make_dataset(data, a.n, a.box, a.states, a.snr, a.seed), "methods": {}}
    print(json.dumps(res["dataset"]), flush=True)
    conf = np.load(data / "conformation.npy")
    idx = np.unique(np.linspace(0, a.n - 1, a.eval_particles).round().astype(int))
    ts = conf[idx]
    res["eval_particles"] = len(idx)

    for name in methods:
        out = work / name
        if name == "cryodrgn":
            run = train_cryodrgn(exe, data, out, a.epochs, a.threads, a.batch, a.seed, a.timeout)
            vol_fn = lambda ck, e: cryodrgn_volumes(exe, ck, idx, work / f"eval_{name}_{e}", a.threads)  # noqa: E731
        else:
            run = train_cryoformer(data, out, a.epochs, a.threads, a.batch, a.seed, a.timeout)
            vol_fn = lambda ck, e: cryoformer_volumes(ck, data, idx, a.box)  # noqa: E731
        cks = run.pop("checkpoints")
        if len(cks) != len(run["epoch_s"]):
            print(f"warning: {name}: {len(cks)} checkpoints, {len(run['epoch_s'])} epoch times", flush=True)
        vols_by_epoch = [vol_fn(ck, e) for e, ck in enumerate(cks, 1)]
        tf, orient = choose_transform(vols_by_epoch[-1][0], __import__("cryoformer.simulate", fromlist=["x"]).true_volume(float(ts[0]), a.box))
        epochs, cum = [], 0.0
        for e, vols in enumerate(vols_by_epoch, 1):
            es = run["epoch_s"][e - 1] if e - 1 < len(run["epoch_s"]) else float("nan")
            cum += es
            epochs.append({"epoch": e, "epoch_s": es, "cum_train_s": cum, "images_per_s": a.n / es,
                           **quality(vols, ts, a.box, tf)})
            print(name, json.dumps(epochs[-1]), flush=True)
        res["methods"][name] = {**run, "orientation": orient, "epochs": epochs}

    stem = RESULTS / ("vs_cryodrgn_quick" if a.quick else f"vs_cryodrgn_D{a.box}_N{a.n}")
    write_report(res, stem)
    print(stem.with_suffix(".md").read_text())
    if not a.quick:
        print(f"work files kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
