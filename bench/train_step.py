"""Training-step benchmarks (printed, not timed tests); baselines run in the same process.

  python bench/train_step.py [--model tiny|minilm|DIR] [--batch 64] [--steps 12] [--chunk 16]

1. A Ray Train step (the real fit(): TorchTrainer, 1 worker, data plan, metrics) against the same
   step in a plain PyTorch loop over the same batches: median step time, goal <= 1.05x.
2. A gradient-cached step (chunks of --chunk rows) against a plain step at the same batch: goal <= 1.4x.
On a GPU it also prints tokens/s and the MFU estimate of the plain loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from toolkit import emit

from raylib.gradcache import forward_backward
from raylib.train_data import iter_steps, make_plan, split_sources, synthetic_pairs
from raylib.jobs.prepare import prepare_for_training
from raylib.ray_train.loop import fit
from raylib.training import build_optimizer, build_encoder, train_flops_per_token, training_step
from raylib.train_config import CheckpointSection, DataSection, ModelSection, ScalingSection, TrainJobConfig, TrainSection
from raylib.objectives.contrastive import ContrastiveObjective
from raylib.schedule import wsd_scheduler


def objective_factory(cfg) -> ContrastiveObjective:
    return ContrastiveObjective(query_max_length=32, document_max_length=64, matryoshka_dims=[16])


def plain_loop(cfg, tables, plan, device) -> list[float]:
    """The same steps as the Ray worker runs, in a bare loop in this process."""
    torch.manual_seed(cfg.train.seed)
    encoder = build_encoder(cfg.model, cfg.train.seed).to(device).train()
    optimizer = build_optimizer(encoder, cfg.train)
    scheduler = wsd_scheduler(optimizer, plan.total_steps, cfg.train.warmup, cfg.train.decay)
    objective = objective_factory(cfg)
    times, tokens = [], []
    tick = time.perf_counter()
    for step, rows in iter_steps(plan, tables, 0, 0):
        _, n = training_step(encoder, encoder, objective, rows, optimizer, scheduler, cfg.train, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - tick)
        tokens.append(n)
        tick = now
    if device.type == "cuda":
        tps = statistics.median(n / t for n, t in zip(tokens[2:], times[2:]))
        flops = train_flops_per_token(encoder, cfg.train, False)
        print(f"GPU plain loop: {tps:,.0f} tokens/s, MFU {tps * flops / (cfg.train.peak_tflops * 1e12):.1%}")
    return times


def grad_cache_vs_plain(cfg, tables, plan, device, chunk: int, repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model, 0).to(device).train()
    objective = objective_factory(cfg)
    _, rows = next(iter_steps(plan, tables, 0, 0))
    features = {s: {k: v.to(device) for k, v in f.items()} for s, f in objective.features(encoder, rows).items()}

    def run(c):
        encoder.zero_grad(set_to_none=True)
        start = time.perf_counter()
        forward_backward(lambda s, f: objective.embed(encoder, s, f), features,
                         lambda reps: objective.loss(reps, features, rows), c, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(None), run(chunk)  # warm up
    plain, cached = [], []
    for _ in range(repeats):  # interleaved, so load changes hit both alike
        plain.append(run(None))
        cached.append(run(chunk))
    return statistics.median(plain), statistics.median(cached)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads in both loops (CPU)")
    p.add_argument("--skip-ray", action="store_true", help="only the gradient-cache comparison")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "max_length": 64}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.parquet"
        pq.write_table(synthetic_pairs(args.batch * args.steps, seed=0), data)
        cfg = TrainJobConfig(
            model=ModelSection(name_or_path=args.model, tiny=tiny if args.model == "tiny" else {}),
            data=DataSection(paths=[str(data)], global_batch_size=args.batch, epochs=1),
            train=TrainSection(lr=1e-4, torch_threads=args.threads, log_every=10 ** 6),
            checkpoint=CheckpointSection(storage_path=str(Path(tmp) / "ckpt"), name="bench",
                                         every_steps=10 ** 6),
            scaling=ScalingSection(num_workers=1, use_gpu=device.type == "cuda", cpus_per_worker=1))
        tables = split_sources(pq.read_table(data))
        plan = make_plan(tables, args.batch, 1, 0, 1)

        plain, cached = grad_cache_vs_plain(cfg, tables, plan, device, args.chunk, repeats=max(5, args.steps))
        print(f"[2] gradient cache, batch {args.batch}, chunk {args.chunk}:")
        print(f"    plain step          median {plain * 1000:8.1f} ms")
        print(f"    gradient-cached     median {cached * 1000:8.1f} ms")
        print(f"    ratio cached/plain  {cached / plain:.3f}x   (goal <= 1.4x)", flush=True)
        if args.skip_ray:
            emit(__file__, {"grad_cache_over_plain": round(cached / plain, 3)})
            return
        plain_first = plain_loop(cfg, tables, plan, device)
        objective = objective_factory(cfg)
        summary = fit(cfg, objective, prepare_for_training(cfg, objective))
        plain_second = plain_loop(cfg, tables, plan, device)
        rows = [json.loads(x) for x in Path(summary["metrics_path"]).read_text().splitlines()]
        ray_times = [r["step_s"] for r in rows][2:]  # drop warm-up steps in both
        plain_times = plain_first[2:] + plain_second[2:]
        ray_med, plain_med = statistics.median(ray_times), statistics.median(plain_times)
        print(f"[1] step, batch {args.batch}, model {args.model}, {device.type}, {args.threads} thread(s):")
        print(f"    plain PyTorch loop  median {plain_med * 1000:8.1f} ms  (n={len(plain_times)}, before+after)")
        print(f"    Ray Train worker    median {ray_med * 1000:8.1f} ms  (n={len(ray_times)})")
        print(f"    ratio Ray/plain     {ray_med / plain_med:.3f}x   (goal <= 1.05x)")

        emit(__file__, {"ray_over_plain": round(ray_med / plain_med, 3),
                        "grad_cache_over_plain": round(cached / plain, 3)})


if __name__ == "__main__":
    main()
