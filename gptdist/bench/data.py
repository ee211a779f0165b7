"""`gptdist bench data`: is the loader fast enough, at every world size? Two tables, measured in one run.

Table 1, per world size W in --worlds (default 1, 2, 4, 8): W loader processes start together, as the W data- parallel
ranks of one job sharing one token cache (a fresh temporary folder); the job consumes --tokens tokens, each rank
--tokens / W of its own windows as micro-batches. Per rank: tokens tokenized (its share of the blocks; the column `x
world` is that share times W over world 1's, 1.00 when it falls exactly as 1/world), seconds of CPU it used and wall
seconds from start to its last batch; over the job: the tokens tokenized against the tokens consumed. The loader's
tokens/s per rank is counted per CPU-second, the rate of a rank with one core for its loader (this machine has fewer
cores than ranks, so wall time measures the sharing of its cores, not the loader); it is shown against the trainer's
consumption, the tokens/s of one rank's forward + backward + AdamW step of the config's GPT.

Table 2 (medians over --repeats), as one rank of one:
* the loader with workers=0 and with W workers, from build_train_loader to --tokens tokens delivered as
  micro-batches (start-up included; its median is shown on its own too), without a cache (data.cache=off);
* the anchor: `datasets`' own non-streaming load_dataset(...) + map(batched=True) tokenizing about the same number
  of tokens of the same text with the same tokenizer (start-up included the same way: a fresh cache every repeat);
* the model: tokens/s of forward + backward + AdamW step of the config's GPT on random tokens.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from gptdist.config import load_config
from gptdist.data.checks import check_data
from gptdist.data.sources import resolve_sources
from gptdist.errors import UserError
from gptdist.machine import usable_cores


def run_bench(args: argparse.Namespace) -> int:
    if args.tokens < 1 or args.repeats < 1 or args.workers < 1:
        raise UserError("--tokens, --repeats and --workers must be at least 1")
    worlds = _worlds(args.worlds)
    cfg = load_config(args.config, args.overrides)
    tok = check_data(cfg.data, cfg.model.vocab_size)
    seq_len, batch = cfg.model.seq_len, cfg.train.micro_batch_size
    model, model_note = _model_rate(cfg, args.model_steps, args.repeats)
    cores = usable_cores()
    print(
        f"gptdist bench data: {args.config}, tokenizer {cfg.data.tokenizer} ({tok.vocab_size} tokens), "
        f"text_split={cfg.data.text_split}, seq_len={seq_len}, micro_batch={batch}, {args.tokens:,} tokens per job "
        f"(table 1) and per run (table 2), "
        f"{cores} CPU cores; trainer: {_num(model)} tokens/s per rank ({model_note})"
    )
    print(world_table([_world_run(cfg, w, -(-args.tokens // w)) for w in worlds], model))
    print()

    rows: List[Tuple[str, Optional[float], Optional[float], str]] = []
    for workers in (0, args.workers):
        runs = [_loader_run(cfg, workers, args.tokens) for _ in range(args.repeats)]
        rate = statistics.median(r[0] for r in runs)
        startup = statistics.median(r[1] for r in runs)
        rows.append((f"loader, workers={workers}", rate, startup, ""))
    anchor, note = _anchor_rate(cfg.data, tok, args.tokens, args.repeats)
    rows.append(("anchor: datasets load_dataset + map(batched)", anchor, None, note))
    rows.append((f"model: fwd+bwd+AdamW, {batch}x{seq_len}", model, None, model_note))
    print(f"one rank, median of {args.repeats}")
    print(f"{'measure':<46} {'tokens/s':>12} {'startup s':>10} {'vs anchor':>10} {'vs model':>9}  note")
    for name, rate, startup, note in rows:
        print(
            f"{name:<46} {_num(rate):>12} {'' if startup is None else f'{startup:.2f}':>10} "
            f"{_ratio(rate, anchor):>10} {_ratio(rate, model):>9}  {note}".rstrip()
        )
    return 0


def _worlds(spec: str) -> List[int]:
    try:
        worlds = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        worlds = []
    if not worlds or min(worlds) < 1:
        raise UserError(f"--worlds {spec!r}: give world sizes as a comma-separated list, e.g. 1,2,4,8")
    return worlds


# ------------------------------------------------------------------------------------------ world-size table


def _rank_main(cfg, rank: int, world: int, cache_dir: str, tokens: int, go, results) -> None:
    # torch: only the rank processes build the data pipeline; the parent process stays light
    from gptdist.data.loader import build_train_loader
    from gptdist.data.producers import ProducerGroup

    try:
        per_batch = cfg.train.micro_batch_size * cfg.model.seq_len
        go.wait()
        t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        done = 0
        with build_train_loader(
            cfg.data.model_copy(update={"workers": 0}), seq_len=cfg.model.seq_len,
            micro_batch_size=cfg.train.micro_batch_size, dp_rank=rank, dp_size=world, seed=cfg.train.seed,
            producers=ProducerGroup(rank, world, cache_dir),
        ) as loader:
            for _ in loader:
                done += per_batch
                if done >= tokens:
                    break
            stats = loader.stats
        c1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
        results.put((rank, {"delivered": done, "tokenized": stats["tokens"], "cpu_s": cpu,
                            "wall_s": time.perf_counter() - t0}))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        results.put((rank, {"error": f"{type(exc).__name__}: {exc}"}))


def _world_run(cfg, world: int, tokens: int) -> Dict[str, object]:
    """W loader processes as the data-parallel ranks of one job, one shared cache."""
    ctx = mp.get_context("fork")
    go, results = ctx.Event(), ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="gptdist-bench-cache-") as cache:
        procs = [ctx.Process(target=_rank_main, args=(cfg, r, world, cache, tokens, go, results), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        go.set()
        ranks = dict(results.get(timeout=1800) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    errors = [v["error"] for v in ranks.values() if "error" in v]
    if errors:
        raise RuntimeError(f"bench data at world {world}: {errors[0]}")
    return {"world": world, "ranks": [ranks[r] for r in range(world)]}


def world_table(runs: Sequence[Dict[str, object]], model: Optional[float]) -> str:
    head = (f"{'world':>5} {'tokenized/rank':>15} {'x world':>9} {'tokenized/consumed':>18} "
            f"{'loader tok/s/rank (CPU s)':>25} {'vs trainer':>10} {'wall s':>7}")
    lines = [head]
    base = None
    for run in runs:
        ranks = run["ranks"]  # type: ignore[index]
        world = int(run["world"])  # type: ignore[arg-type]
        per_rank = statistics.median(r["tokenized"] for r in ranks)
        total = sum(r["tokenized"] for r in ranks)
        consumed = sum(r["delivered"] for r in ranks)
        rate = statistics.median(r["delivered"] / max(r["cpu_s"], 1e-9) for r in ranks)
        wall = max(r["wall_s"] for r in ranks)
        # Tokenizing per rank relative to world 1's, times the world: 1.00 means it falls exactly as 1/world.
        base = base if base is not None else per_rank * world
        scale = per_rank * world / base if base else float("nan")
        lines.append(f"{world:>5} {per_rank:>15,.0f} {scale:>9.2f} {total / max(consumed, 1):>18.2f} "
                     f"{rate:>25,.0f} {_ratio(rate, model):>10} {wall:>7.1f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- one-rank rows


def _num(rate: Optional[float]) -> str:
    return "n/a" if rate is None else f"{rate:,.0f}"


def _ratio(rate: Optional[float], base: Optional[float]) -> str:
    return "" if rate is None or not base else f"{rate / base:.2f}x"


def _loader_run(cfg, workers: int, tokens: int) -> Tuple[float, float]:
    """(tokens/s from build to `tokens` delivered, seconds to the first micro-batch)."""
    # torch: only the rank processes build the data pipeline; the parent process stays light
    from gptdist.data.loader import build_train_loader

    data = cfg.data.model_copy(update={"workers": workers, "cache": "off"})
    per_batch = cfg.train.micro_batch_size * cfg.model.seq_len
    t0 = time.perf_counter()
    first = None
    done = 0
    with build_train_loader(
        data, seq_len=cfg.model.seq_len, micro_batch_size=cfg.train.micro_batch_size,
        dp_rank=0, dp_size=1, seed=cfg.train.seed,
    ) as loader:
        for _ in loader:
            first = first if first is not None else time.perf_counter() - t0
            done += per_batch
            if done >= tokens:
                break
    return done / (time.perf_counter() - t0), first or 0.0


def _anchor_rate(data_cfg, tok, tokens: int, repeats: int) -> Tuple[Optional[float], str]:
    sources = resolve_sources(data_cfg)
    files = [f for s in sources for f in s.files]
    kinds = {f.kind for f in files}
    fields = {s.text_field for s in sources}
    if any(s.hub is not None for s in sources) or len(kinds) != 1 or (kinds != {"text"} and len(fields) != 1):
        return None, "n/a: needs local files of one kind (and one text field)"
    kind = kinds.pop()
    field = "text" if kind == "text" else sources[0].text_field
    rates = []
    for _ in range(repeats):
        rate = _anchor_once(kind, [f.path for f in files], data_cfg.text_split, field, tok, tokens)
        rates.append(rate)
    return statistics.median(rates), ""


def _anchor_once(kind: str, files: List[str], text_split: str, field: str, tok, tokens: int) -> float:
    # datasets: slow to import, only for the --anchor row
    import datasets
    from datasets import load_dataset

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    kwargs: Dict[str, object] = {"sample_by": text_split} if kind == "text" else {}
    if kind == "parquet":
        kwargs["columns"] = [field]
    encode: Callable = getattr(tok.tokenizer, "encode_batch_fast", tok.tokenizer.encode_batch)

    def tokenize(batch: Dict[str, list]) -> Dict[str, list]:
        texts = [t for t in batch[field] if t and not t.isspace()]
        return {"input_ids": [e.ids for e in encode(texts, add_special_tokens=False)]}

    with tempfile.TemporaryDirectory(prefix="gptdist-bench-") as cache:
        t0 = time.perf_counter()
        ds = load_dataset(kind, data_files=files, split="train", cache_dir=cache, **kwargs)
        rows = _rows_for(ds, field, tok, tokens)
        ds = ds.select(range(rows)) if rows < len(ds) else ds
        out = ds.map(
            tokenize, batched=True, batch_size=1000, remove_columns=ds.column_names,
            keep_in_memory=True, load_from_cache_file=False, new_fingerprint="gptdist-bench",
        )
        elapsed = time.perf_counter() - t0
    count = sum(len(ids) for ids in out["input_ids"])
    return count / elapsed


def _rows_for(ds, field: str, tok, tokens: int) -> int:
    """Rows holding about `tokens` tokens, estimated from the first rows' characters per token."""
    probe = [t for t in ds.select(range(min(200, len(ds))))[field] if t]
    chars = sum(len(t) for t in probe)
    per_token = chars / max(1, sum(len(i) for i in tok.encode_batch(probe)))
    want, total = tokens * per_token, 0
    for start in range(0, len(ds), 5000):
        for i, text in enumerate(ds.select(range(start, min(len(ds), start + 5000)))[field]):
            total += len(text or "")
            if total >= want:
                return start + i + 1
    return len(ds)


def _model_rate(cfg, steps: int, repeats: int) -> Tuple[Optional[float], str]:
    try:
        # torch: only for the model-rate row; the parent process stays light
        import torch

        from gptdist.model import GPT, init_parameters
    except ImportError as exc:  # the model package is optional for this bench
        return None, f"n/a: {exc}"
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    init_parameters(model, cfg.train.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    b, t = cfg.train.micro_batch_size, cfg.model.seq_len
    x = torch.randint(0, cfg.model.vocab_size, (b, t))
    y = torch.randint(0, cfg.model.vocab_size, (b, t))

    def step() -> None:
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, AdamW state
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(b * t * steps / (time.perf_counter() - t0))
    params = sum(p.numel() for p in model.parameters())
    return statistics.median(rates), f"{params / 1e6:.1f}M parameters, {torch.get_num_threads()} torch threads"
