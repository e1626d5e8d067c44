"""One prepared GPU run (< 8 minutes on one GPU), writing one results table:

  1. the `gpu`-marked tests;
  2. a T5 `base` training step in bf16 (autocast), ours and `transformers`' with the same weights, alternated:
     time, model FLOPs utilisation (MFU) against the device's peak, and the ratio ours / transformers;
  3. our Reformer (and `transformers`' where it fits) at 16K and 64K tokens: training-step time and peak memory,
     through `benchmarks/bench_reformer.py --device cuda`;
  4. a tiny `dvc repro pretrain` on the GPU with DeepSpeed ZeRO-2, in a fresh copy of the project.

    bash benchmarks/gpu.sh                       # on a CUDA machine; table in artifacts/gpu/results.md
    bash benchmarks/gpu.sh --dry-run             # the same steps on CPU with tiny sizes (tests/test_gpu_script.py)

MFU = model FLOPs per step (`training_flops`, 6 per weight per token plus attention) / step time / peak dense bf16
FLOPs of the device (a table of known devices; `--peak-tflops` for others). The dry run reports no MFU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# dense bf16 peak, TFLOP/s (vendor data sheets, without sparsity)
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10": 125.0, "V100": 125.0}
PROJECT_FILES = ("pipeline", "models", "params.yaml", "dvc.yaml", ".dvcignore", ".gitignore")


def _env() -> dict[str, str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": path}
    env.pop("PYTHONPATH", None)
    return env


def _run(cmd: list[str], cwd: Path, timeout: float) -> tuple[int, str]:
    """(exit code, combined output) of a command in its own process group; on timeout the whole group (dvc and the
    stage it started) is killed and the exit code is 124."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out = proc.communicate(timeout=timeout)[0]  # reads as it goes: no full-pipe deadlock
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return 124, f"timed out after {timeout:.0f} s\n{proc.communicate()[0]}"


def gpu_tests(args) -> list[tuple[str, str, str]]:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    if args.dry_run:
        cmd.append("--collect-only")  # on CPU they would only skip: check that they are found
    code, out = _run(cmd, ROOT, args.timeout)
    last = [line for line in out.strip().splitlines() if line.strip()][-1:] or ["no output"]
    return [("gpu tests", "pytest -m gpu" + (" --collect-only" if args.dry_run else ""), f"exit {code}: {last[0]}")]


def t5_step(args) -> list[tuple[str, str, str]]:
    import torch
    import torch.nn.functional as F
    from bench_t5 import batch, build
    from timing import alternate, median, ratio_spread, spread

    device = torch.device(args.device)
    preset, (b, s, t) = ("tiny", (2, 64, 16)) if args.dry_run else ("base", (args.t5_batch, 512, 114))
    ours, ref = build(preset, None, 0)
    data = [x.to(device) for x in batch(ours.config, b, s, t)]
    steps = {}
    for name, model in (("ours", ours), ("ref", ref)):
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt, is_ref=name == "ref"):
            x, am, dec_in, labels = data
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model(input_ids=x, attention_mask=am, decoder_input_ids=dec_in)
                logits = out.logits if is_ref else out
                loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()

        steps[name] = step
    times = alternate(steps, 2 if args.dry_run else 10, warmup=1 if args.dry_run else 3)
    flops = ours.training_flops(b, s, t)
    rows = [
        (f"T5 {preset} train step bf16", f"b{b} {s}/{t}, ours s", spread(times["ours"])),
        (f"T5 {preset} train step bf16", "transformers s", spread(times["ref"])),
        (f"T5 {preset} train step bf16", "ours / transformers", ratio_spread(times["ours"], times["ref"])),
    ]
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    for who in ("ours", "ref"):
        label = "MFU ours" if who == "ours" else "MFU transformers"
        value = "n/a (no peak for this device)" if not peak else f"{flops / median(times[who]) / (peak * 1e12):.1%}"
        rows.append((f"T5 {preset} train step bf16", label, value))
    del ours, ref, steps
    return rows


def reformer_long(args) -> list[tuple[str, str, str]]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_reformer.py"), "--device", args.device, "--depths"]
    if args.dry_run:
        cmd += ["--lengths", "256", "--models", "reformer", "--paired-lengths", "--max-quadratic-length", "0"]
    else:
        cmd += ["--lengths", "16384", "65536", "--models", "reformer", "hf", "--paired-lengths", "16384"]
        cmd += ["--max-quadratic-length", "0", "--long", "65536"]
    code, out = _run(cmd, ROOT, args.timeout)
    (args.out.parent / "reformer_long.txt").write_text(out)
    rows = [("Reformer long sequences", "bench_reformer.py", f"exit {code} (full table: reformer_long.txt)")]
    for line in out.splitlines():
        if line.startswith("|") and any(ch.isdigit() for ch in line) and "---" not in line:
            rows.append(("Reformer long sequences", "row", line.strip("| ").replace("|", ";")))
    return rows


def dvc_zero2(args) -> list[tuple[str, str, str]]:
    import yaml

    work = Path(tempfile.mkdtemp(prefix="gpu-dvc-"))
    try:
        for name in PROJECT_FILES:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, work / name)
        params = yaml.safe_load((work / "params.yaml").read_text())
        params["data"]["max_documents"] = 200
        params["tokenizer"]["vocab_size"] = 1000
        params["seeds"] = [0]
        params["pretrain"].update(max_steps=6, batch_size=4, val_every_n_steps=3, checkpoint_every_n_steps=3)
        params["pretrain"]["optimizer"]["warmup_steps"] = 2
        params["trainer"]["divergence"]["patience_steps"] = 6  # at most the 6 steps (pipeline/config/)
        # On CPU, DeepSpeed compiles its ops at first use (minutes on a busy machine; tests/test_deepspeed.py covers
        # ZeRO on CPU): the dry run checks the stage wiring with the plain strategy unless --dry-run-deepspeed.
        deepspeed = not args.dry_run or args.dry_run_deepspeed
        params["trainer"].update(
            accelerator="cpu" if args.dry_run else "gpu",
            strategy="deepspeed" if deepspeed else "auto",
            precision="32-true" if args.dry_run else "bf16-mixed",
        )
        params["deepspeed"]["stage"] = 2
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
            _run(cmd, work, 60)
        start = time.perf_counter()
        # dry run: the first variant only (DeepSpeed's CPU start-up dominates); on the GPU every variant
        target = f"pretrain@{next(iter(params['models']))}-0" if args.dry_run else "pretrain"
        strategy = "ZeRO-2" if deepspeed else "strategy auto (dry run)"
        code, out = _run([sys.executable, "-m", "dvc", "repro", target], work, args.timeout)
        took = time.perf_counter() - start
        (args.out.parent / "dvc_repro.txt").write_text(out)
        runs = sorted(str(p.relative_to(work)) for p in (work / "metrics").rglob("*.json")) if code == 0 else []
        return [
            ("dvc repro pretrain, ZeRO-2", "dvc repro pretrain", f"exit {code}, {took:.0f} s, {target}, {strategy}"),
            ("dvc repro pretrain, ZeRO-2", "metrics written", ", ".join(runs) or "none"),
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)


SECTIONS = {"tests": gpu_tests, "t5": t5_step, "reformer": reformer_long, "dvc": dvc_zero2}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script, measures nothing")
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "gpu" / "results.md")
    p.add_argument("--skip", nargs="*", default=[], choices=list(SECTIONS))
    p.add_argument("--dry-run-deepspeed", action="store_true", help="dry run: repro with ZeRO-2 on CPU as well")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak dense bf16, if not in the table")
    p.add_argument("--t5-batch", type=int, default=16)
    p.add_argument("--timeout", type=float, default=150.0, help="seconds per subprocess section")
    args = p.parse_args(argv)
    import torch
    from timing import load_average

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    args.device = "cpu" if args.dry_run else "cuda"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    device = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
    lines = [f"# GPU run: {device}", "", f"torch {torch.__version__}; {load_average()}", ""]
    lines += ["| section | measure | value |", "| --- | --- | --- |"]
    failed = False
    for name, section in SECTIONS.items():
        if name in args.skip:
            continue
        start = time.perf_counter()
        try:
            rows = section(args)
        except Exception as e:  # one broken section must not lose the others' figures
            rows, failed = [(name, "error", f"{type(e).__name__}: {e}".replace("\n", " ")[:300])], True
        failed |= any(v.startswith("exit ") and not v.startswith("exit 0") for _, _, v in rows)
        rows.append((name, "section seconds", f"{time.perf_counter() - start:.0f}"))
        lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
        args.out.write_text("\n".join(lines) + "\n")  # written after every section
        print("\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows), flush=True)
    print(f"results: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
