"""One rank of ``tempo-ds pretrain``: a preset model trained on real text through ``tempo_ds.initialize``.

Data: the token stream of ``--data`` (or the embedded corpus) cut into windows; every optimizer step reads one
global batch of ``micro_batch x accumulation x ranks`` windows, each rank its own rows (``lm_batches``), so a
resumed run reads exactly what the uninterrupted run would have. Metrics go through DeepSpeed's monitor
(``csv_monitor`` / ``tensorboard`` / ``wandb`` / ``comet`` sections of the config) from rank 0; rank 0 also
shows a progress bar (when its stderr is a terminal) and prints a log line every ``--log_interval`` steps. SIGINT and SIGTERM end the run
after the current step with a checkpoint (see checkpoints.py); the exit status is then 130.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import warnings

import torch

from .spawn import local_rank

MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
INTERRUPTED = 130


class StopRequest:
    """Remembers a SIGINT/SIGTERM instead of raising in the middle of a step (or of a collective) while
    installed; ``restore()`` puts the previous handlers back."""

    def __init__(self):
        self.signal = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signal is not None


def mpi_ranks_with_given_master() -> None:
    """Under mpirun with MASTER_ADDR exported: RANK, WORLD_SIZE and LOCAL_RANK from mpi4py (as DeepSpeed's
    mpi_discovery computes them), keeping the given master address instead of rank 0's ``hostname -I``."""
    if "RANK" in os.environ or "MASTER_ADDR" not in os.environ or not any(v in os.environ for v in MPI_VARS):
        return
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    names = comm.allgather(MPI.Get_processor_name())
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(comm.Get_size()),
                      LOCAL_RANK=str(sum(n == names[rank] for n in names[:rank])))
    os.environ.setdefault("MASTER_PORT", "29500")


def _dtype(config: dict) -> str:
    return "bf16" if config.get("bf16", {}).get("enabled") else "fp16" if config.get("fp16", {}).get("enabled") \
        else "fp32"


def _monitor_paths(config: dict) -> list[str]:
    return [os.path.join(config[s]["output_path"], config[s].get("job_name", "DeepSpeedJobName"))
            for s in ("csv_monitor", "tensorboard")
            if config.get(s, {}).get("enabled") and config[s].get("output_path")]


def _peak_memory() -> int:
    from deepspeed.accelerator import get_accelerator

    return int(get_accelerator().max_memory_allocated())


class Run:
    """The state of one rank's training run."""

    def __init__(self, args, inputs):
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")  # DeepSpeed's own call
        import deepspeed
        import deepspeed.comm as dist

        import tempo_ds
        from tempo_ds import presets
        from tempo_ds.data import embedded_token_stream, lm_batches, token_stream
        from tempo_ds.deepspeed_integration import deepspeed_activation_checkpointing

        from . import options

        self.args = args
        if not torch.cuda.is_available():
            torch.set_num_threads(args.threads)
        mpi_ranks_with_given_master()
        deepspeed.init_distributed(dist_backend=deepspeed.get_accelerator().communication_backend_name(),
                                   auto_mpi_discovery=True, distributed_port=int(os.environ.get("MASTER_PORT", 29500)))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if args.overwrite:
            if local_rank() == 0:
                options.clear_run(args)
            dist.barrier()
        self.config = inputs.config
        self.dtype = _dtype(self.config)
        self.stage = self.config.get("zero_optimization", {}).get("stage", 0)

        tok = inputs.tokenizer
        ids = embedded_token_stream(tok) if inputs.texts is None else token_stream(inputs.texts, tok)
        model = presets.build_model(args.arch, args.size, seed=args.seed, vocab_size=len(tok),
                                    max_seq=max(args.seq_len, 64), layers=args.layers,
                                    zero3_config=self.config if self.stage == 3 else None)
        if "activation_checkpointing" in self.config:
            deepspeed_activation_checkpointing(model)
        args.deepspeed_config = None  # the (possibly overridden) dict goes in as config=
        self.engine, *_ = tempo_ds.initialize(args=args, model=model, model_parameters=model.parameters(),
                                              config=self.config)
        state = getattr(self.engine.module, "_tempo_ds_state", None)
        self.report = state["report"] if state else None
        self.accum = self.engine.gradient_accumulation_steps()
        self.micro = self.engine.train_micro_batch_size_per_gpu()
        self.mlm = args.arch in presets.MLM_ARCHS
        self.data = lm_batches(ids, args.seq_len, self.micro, mlm=self.mlm, tokenizer=tok, seed=args.seed,
                               rank=self.rank, world_size=self.world)
        self.tokens_per_step = self.micro * args.seq_len * self.accum * self.world
        self.save_dir = options.checkpoint_dir(args)
        self.losses: list[float] = []
        self.step = 0
        self.saved_step = None
        self.checkpoint = None
        self.layer_bytes_in_run = None
        self.first_step, self.timed_steps, self.tokens_per_s, self.save_s = 0, 0, None, 0.0

    # -- checkpoints -------------------------------------------------------------------------------------
    def _identity(self) -> dict:
        """What the data order and the model depend on: a checkpoint resumes only a run with the same."""
        a = self.args
        path = lambda p: None if p is None else os.path.abspath(p)  # noqa: E731
        return {"arch": a.arch, "size": a.size, "layers": a.layers, "seq_len": a.seq_len, "seed": a.seed,
                "rows_per_step": self.micro * self.accum * self.world, "data": path(a.data),
                "tokenizer": path(a.tokenizer)}

    def resume(self) -> None:
        """Load the latest complete checkpoint and move the data to where it stopped."""
        from . import checkpoints

        client = checkpoints.load(self.engine, self.save_dir)
        mismatch = {k: (client["identity"].get(k), v) for k, v in self._identity().items()
                    if client["identity"].get(k) != v}
        if mismatch:
            raise ValueError("--resume: the checkpoint belongs to a different run; " + ", ".join(
                f"{k}: checkpoint {old!r}, now {new!r}" for k, (old, new) in mismatch.items()))
        self.step, self.losses = client["step"], list(client["losses"])
        self.saved_step = self.step
        for _ in range(self.step * self.accum):  # the same windows as an uninterrupted run
            next(self.data)

    def save(self) -> None:
        """A checkpoint of this step (collective); its time is left out of tokens/s."""
        from . import checkpoints

        start = time.perf_counter()
        client = {"step": self.step, "losses": self.losses, "identity": self._identity()}
        self.checkpoint = checkpoints.save(self.engine, self.save_dir, self.step, client, self.args.keep)
        self.saved_step = self.step
        self.save_s += time.perf_counter() - start

    # -- training ------------------------------------------------------------------------------------------
    def train_step(self, stop: StopRequest) -> tuple[float, bool]:
        """One optimizer step; (loss averaged over micro-steps and ranks, whether any rank was asked to stop)."""
        from tempo_ds.memory import SavedTensorMeter

        total = torch.zeros((), device=self.engine.device)
        for _ in range(self.accum):
            batch = {k: v.to(self.engine.device) for k, v in next(self.data).items()}
            if self.layer_bytes_in_run is None:
                with SavedTensorMeter(self.engine.module) as meter:
                    loss = self.engine(**batch).loss
                per_layer = meter.per_layer
                self.layer_bytes_in_run = per_layer[len(per_layer) // 2] if per_layer else 0
            else:
                loss = self.engine(**batch).loss
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
        flags = torch.stack([total / self.accum, torch.tensor(float(stop.requested), device=total.device)])
        self.dist.all_reduce(flags)
        return flags[0].item() / self.world, flags[1].item() > 0

    def fit(self) -> bool:
        """Train to ``--steps``; True if a signal ended the run early."""
        from tqdm import tqdm

        args, rank0 = self.args, self.rank == 0
        stop = StopRequest()
        bar = tqdm(total=args.steps, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True,
                   disable=not rank0 or args.no_progress or not sys.stderr.isatty())
        self.first_step = first_step = self.step
        started, interrupted = None, False
        while self.step < args.steps:
            t0 = time.perf_counter()
            loss, interrupted = self.train_step(stop)
            self.step += 1
            self.losses.append(loss)
            if self.step == first_step + 1:
                started = time.perf_counter()  # the first step (warm-up, allocation) is not timed
                self.save_s = 0.0
            else:
                self.timed_steps += 1
            timed_s = time.perf_counter() - started - self.save_s
            self.tokens_per_s = self.tokens_per_step * self.timed_steps / timed_s if self.timed_steps \
                else self.tokens_per_step / (time.perf_counter() - t0)
            lr = self.engine.get_lr()[0]
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{self.tokens_per_s:,.0f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            events = [("Train/loss", loss, self.step)]
            if self.step % args.log_interval == 0 or self.step in (first_step + 1, args.steps) or interrupted:
                events += [("Train/tokens_per_s", self.tokens_per_s, self.step),
                           ("Train/peak_memory_bytes", _peak_memory(), self.step),
                           ("Train/saved_activation_bytes_per_layer", self.layer_bytes_in_run, self.step)]
                if rank0:
                    bar.write(f"step {self.step}/{args.steps} loss {loss:.6f} lr {lr:.3e} "
                              f"tokens/s {self.tokens_per_s:,.0f} peak {_peak_memory() / 2**20:,.0f} MiB")
            self.engine.monitor.write_events(events)
            if interrupted or (args.save_interval and self.step % args.save_interval == 0):
                self.save()
            if interrupted:
                break
        bar.close()
        if self.saved_step != self.step:
            self.save()
        stop.restore()  # from here on Ctrl-C interrupts as usual
        return interrupted

    def summary(self, interrupted: bool):
        """The end-of-run :class:`Summary` (rank 0; meters a 2-layer copy of the preset on the run's device)."""
        from .summary import Summary, layer_memory

        from tempo_ds.config import TempoConfig

        a = self.args
        peak = _peak_memory()  # before the 2-layer copy below adds its own
        tempo = self.report.config.model_dump() if self.report else TempoConfig().model_dump()
        memory = layer_memory(a.arch, a.size, seq=a.seq_len, batch=self.micro, dtype=self.dtype,
                              device=self.engine.device, tempo=tempo, tokenizer=a.tokenizer, seed=a.seed)
        memory.in_run = self.layer_bytes_in_run
        run = (f"{a.arch}-{a.size}{f' ({a.layers} layers)' if a.layers else ''} {'MLM' if self.mlm else 'causal LM'}, "
               f"{self.world} rank{'s' if self.world > 1 else ''} ({self.engine.device.type}), {self.dtype}, "
               f"ZeRO-{self.stage}, micro-batch {self.micro} x {a.seq_len} tokens"
               + (f" x {self.accum} accumulation" if self.accum > 1 else ""))
        return Summary(run, self.report is not None, [self.first_step + 1, self.step],
                       self.losses, self.tokens_per_s if self.timed_steps else None, memory, peak,
                       self.checkpoint, _monitor_paths(self.config), interrupted,
                       "max_memory_allocated" if self.engine.device.type == "cuda" else "resident set size")

    def write_report(self, report_dir: str) -> None:
        """DIR/rank<N>.json: ranks, losses and the modules tempo_ds replaced (what the launcher tests compare)."""
        os.makedirs(report_dir, exist_ok=True)
        r = self.report
        out = {"rank": self.rank, "world_size": self.world, "local_rank": local_rank(),
               "master_addr": os.environ.get("MASTER_ADDR"), "host": socket.gethostname(), "pid": os.getpid(),
               "model": f"{self.args.arch}-{self.args.size}", "dtype": self.dtype, "zero_stage": self.stage,
               "tempo": r.config.techniques() if r else None,
               "replaced": [[s.name, type(s.old).__name__, type(s.new).__name__, s.technique] for s in r.replaced]
               if r else [], "losses": self.losses, "layer_bytes_in_run": self.layer_bytes_in_run}
        with open(os.path.join(report_dir, f"rank{self.rank}.json"), "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)


def run(args, inputs) -> int:
    """Train on this rank with the parsed ``args`` and what the checks loaded (``inputs``); 0, or 130 when a
    signal ended the run (after a checkpoint)."""
    job = Run(args, inputs)
    if args.resume:
        job.resume()
    if job.step >= args.steps:
        if job.rank == 0:
            print(f"tempo-ds pretrain: the checkpoint is at step {job.step}, --steps is {args.steps}: nothing to do")
        return 0
    interrupted = job.fit()
    try:
        if args.report_dir:
            job.write_report(args.report_dir)
        if job.rank == 0:
            summary = job.summary(interrupted)
            summary.write(os.path.join(args.out, "summary.json"))
            print(summary.text(), flush=True)
            if interrupted:
                print(f"interrupted at step {job.step}: resume with the same arguments and --resume", flush=True)
    finally:  # the other ranks wait here for rank 0's summary, also when it fails
        job.dist.barrier()
    return INTERRUPTED if interrupted else 0


def finish(code: int) -> None:
    """Leave without interpreter teardown: once every result is written, DeepSpeed's communication threads can
    abort the process in their destructors ("terminate called without an active exception")."""
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")  # under mpirun: MPI_Finalize, or mpirun reports an improper exit
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)
