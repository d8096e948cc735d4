"""Training and sampling throughput of any config or preset, with the speed options side by side.

Each variant (a precision plus speed options, see :class:`Variant`) runs in its own worker process, so options that
are process-wide (the CPU allocator setting, torch.compile caches) never leak into the others and each worker's peak
memory is its own. The parent measures the machine's matmul peak, then asks the workers for one timed repeat each in
turn (interleaved, so drift of the machine hits every variant alike), and reports medians. Only one worker computes
at any time. ``scripts/benchmark.py`` is the command line over this module.

What one repeat times: ``train`` -- ``steps`` optimizer steps (forward, loss, backward, AdamW, EMA update; with
``data="loader"`` also reading and, for on-the-fly latent training, VAE-encoding the batch); ``sample`` -- one batch
drawn with the configured sampler at its ``steps`` setting ``nfe`` (with classifier-free guidance when ``guidance`` > 1,
both halves in one batched forward). ``steps`` is the sampler's own count, which is not always the number of network
evaluations (the transport samplers count grid points, heun2 calls the network twice per step, the SDE samplers
twice per drift, dopri5 adapts), so every repeat also counts the forward calls it made (forward hooks): ``nfe`` in
the results is that count per sampled batch. FLOPs are the forward's (:func:`diffusion.tools.flops.forward_flops`);
MFU = FLOPs actually needed per second / the measured matmul peak, with a training step costing 3x the forward.

Presets (``Setup.preset``, without a config file) load their family's recipe (:data:`PRESET_FAMILIES`): U-ViT-*
the base config (vp_sde), DiT-* configs/imagenet256_dit_xl2.py, SiT-* configs/imagenet256_sit_xl2.py (flow
matching on the same DiT network), with the preset's size. A training repeat runs the trainer's own loss
(``diffusion.training.loop.loss_terms``), EMA update and optimizer.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field

import accelerate
import diffusers
import torch

from diffusion.config.loading import apply_override, load_config, parse_value
from diffusion.config.schema import base_config
from diffusion.errors import ConfigError
from diffusion.registry import (
    attention_paths,
    build_model,
    build_objective,
    describe,
    resolve_model_kwargs,
    set_attention,
)
from diffusion.released import REPO
from diffusion.sampling.loader import input_shape
from diffusion.sampling.settings import overlay, sampler_settings
from diffusion.tools.flops import forward_flops, synthetic_conditioning
from diffusion.training.data import batch_conditioning, prepare_data, stream_batches
from diffusion.training.loop import loss_terms
from diffusion.training.pieces import update_ema
from diffusion.training.repa import build_repa
from diffusion.training.speed import OPTIMIZER_IMPLS, adamw, reuse_freed_memory

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Named option sets: "plain" is the path before any speed work (SDPA, torch's default AdamW loop on CPU, glibc's
# default allocator); "fast" is what the trainer does by default; "compiled" adds torch.compile.
OPTION_SETS = {
    "plain": dict(attention="sdpa", optimizer="for_loop", reuse_memory=False, compile=False),
    "fast": dict(attention="auto", optimizer="fused", reuse_memory=True, compile=False),
    "compiled": dict(attention="auto", optimizer="fused", reuse_memory=True, compile=True),
}


@dataclass
class Variant:
    """One way of running the same workload. ``config`` holds dotted config overrides of this variant only."""

    name: str
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; weights, optimizer and EMA stay fp32)
    attention: str = "sdpa"  # auto | sdpa | math
    optimizer: str = "for_loop"  # fused | foreach | for_loop
    reuse_memory: bool = False  # diffusion.training.speed.reuse_freed_memory (CPU)
    compile: bool = False  # torch.compile of the backbone (inductor)
    checkpointing: bool | None = None  # gradient checkpointing of the blocks (model.use_checkpoint); None: config's
    channels_last: bool = False  # channels-last memory format for the convolutions
    tf32: bool = False  # TF32 matmuls (CUDA)
    data: str = "synthetic"  # synthetic: random tensors of the data shape; loader: the config's dataset
    # With repa.encoders set (training): "images" runs the encoders on the batch's images at every step (data.name
    # = imagenet); "cached" reads their features as a feature cache serves them (computed once, before timing)
    repa_targets: str = "images"
    config: dict = field(default_factory=dict)


def parse_variant(spec: str) -> Variant:
    """``NAME:key=value,key=value``: keys are :class:`Variant` fields, ``options=<set>`` (an OPTION_SETS entry) or
    dotted config keys (``data.name=latents``), e.g. ``bf16-math:precision=bf16,options=plain,attention=math``."""
    name, _, body = spec.partition(":")
    fields = {f.name: f for f in dataclasses.fields(Variant)}
    values, config = {}, {}
    for item in filter(None, body.split(",")):
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"variant {spec!r}: {item!r} is not key=value")
        if key == "options":
            if text not in OPTION_SETS:
                raise ConfigError(f"variant {spec!r}: unknown option set {text!r}; known: {', '.join(OPTION_SETS)}")
            values.update(OPTION_SETS[text])
        elif "." in key:
            config[key] = text
        elif key in fields and key not in ("name", "config"):
            values[key] = parse_value(text, True) if "bool" in str(fields[key].type) else text
        else:
            raise ConfigError(f"variant {spec!r}: unknown key {key!r}; known: options, "
                             f"{', '.join(k for k in fields if k not in ('name', 'config'))}, or a dotted config key")
    variant = Variant(name=name, config=config, **values)
    check_variant(variant)
    return variant


def check_variant(variant: Variant) -> None:
    for key, value, known in (("precision", variant.precision, tuple(PRECISIONS)),
                              ("attention", variant.attention, attention_paths()),
                              ("optimizer", variant.optimizer, OPTIMIZER_IMPLS),
                              ("data", variant.data, ("synthetic", "loader")),
                              ("repa_targets", variant.repa_targets, ("images", "cached"))):
        if value not in known:
            raise ConfigError(f"variant {variant.name!r}: unknown {key} {value!r}; known: {', '.join(known)}")


def standard_variants(precisions: list[str], option_sets: list[str]) -> list[Variant]:
    """``<precision>-<option set>`` for every pair, e.g. fp32-plain, fp32-fast, bf16-plain, bf16-fast."""
    return [Variant(name=f"{p}-{o}", precision=p, **OPTION_SETS[o]) for p in precisions for o in option_sets]


# ----------------------------------------------------------------------------------------------------------
# The workload of one worker
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What every variant of one comparison shares."""

    config_path: str = ""  # a config file, or empty with ``preset``
    preset: str = ""  # e.g. U-ViT-S/2, DiT-S/2, SiT-S/2: that backbone's defaults and its family's recipe
    overrides: dict = field(default_factory=dict)  # dotted key -> value text, as --config.a.b=v
    task: str = "train"  # train | sample
    batch: int = 8
    steps: int = 1  # optimizer steps per timed repeat (train)
    nfe: int = 0  # sampling: the sampler's steps setting; 0 = the config's sample.steps (results: evaluations made)
    sampler: str = ""  # sampling: empty = the config's sample.sampler
    guidance: float = 0.0  # sampling: classifier-free guidance scale; 0 = the config's sample.guidance_scale
    device: str = "cpu"
    threads: int = 0  # torch threads per worker; 0 = torch's default
    seed: int = 0


# preset family (the name before the size, "SiT" of "SiT-S/2") -> (model.name, the paper config whose recipe it runs;
# None: base_config()'s own, U-ViT's vp_sde). The recipes are the configs' own, never copied here.
PRESET_FAMILIES = {"U-ViT": ("uvit", None), "DiT": ("dit", "imagenet256_dit_xl2.py"),
                   "SiT": ("dit", "imagenet256_sit_xl2.py")}


def preset_family(preset: str) -> str:
    """``U-ViT-S/2`` -> ``U-ViT``, ``SiT-XL/2`` -> ``SiT``; an unknown family is a ConfigError naming the known."""
    family = preset.rpartition("-")[0]
    if family not in PRESET_FAMILIES:
        raise ConfigError(f"unknown preset family {family or preset!r} of preset {preset!r}; known: "
                          f"{', '.join(f'{f}-*' for f in PRESET_FAMILIES)}")
    return family


def build_config(setup: Setup, variant: Variant):
    overrides = [(key, str(text)) for key, text in {**setup.overrides, **variant.config}.items()]
    if setup.config_path:
        config = load_config(setup.config_path, overrides)
    else:
        name, recipe = PRESET_FAMILIES[preset_family(setup.preset)]
        config = base_config() if recipe is None else load_config(REPO / "configs" / recipe)
        config.model.update(name=name, preset=setup.preset)
        resolve_model_kwargs(config.model)  # an unknown size (DiT-Q/2) fails here, before any worker starts
        for key, value in overrides:
            apply_override(config, key, value)
    if variant.checkpointing is not None:
        config.model.use_checkpoint = variant.checkpointing
    return config


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def current_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Workload:
    """The model, data and step of one variant, built inside its worker."""

    def __init__(self, setup: Setup, variant: Variant):
        self.setup, self.variant = setup, variant
        self.device = torch.device(setup.device)
        self.config = config = build_config(setup, variant)
        torch.manual_seed(setup.seed)
        self.net = set_attention(build_model(config.model), variant.attention).to(self.device)
        if variant.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.images = self.features = None  # REPA's targets' images / cached features (_repa)
        self.repa = self._repa() if setup.task == "train" else None  # its tap: before compiling
        self.model = torch.compile(self.net) if variant.compile else self.net
        self.objective = build_objective(config.diffusion)
        generator = torch.Generator().manual_seed(setup.seed)
        self.shape = input_shape(config)
        self.batches = self._loader() if variant.data == "loader" else None
        self.x = torch.randn(setup.batch, *self.shape, generator=generator).to(self.device)
        self.cond = synthetic_conditioning(self.net, setup.batch, self.device, generator)
        self.flops = forward_flops(config, self.cond)
        self.autocast = torch.autocast(self.device.type, dtype=PRECISIONS[variant.precision],
                                       enabled=variant.precision != "fp32")
        if setup.task == "train":
            self.net.train()
            self.ema = copy.deepcopy(self.net).requires_grad_(False).eval()
            oc = config.optim
            params = [*self.net.parameters(), *(self.repa.projectors.parameters() if self.repa else ())]
            self.optimizer = adamw(params, oc.lr, oc.betas, oc.eps, variant.optimizer)
            fp16_cuda = variant.precision == "fp16" and self.device.type == "cuda"
            self.scaler = torch.amp.GradScaler("cuda") if fp16_cuda else None
        else:
            self.net.eval()
        self.network_seconds, self.network_rows, self.network_calls = 0.0, 0, 0
        self.sampling = self._sample_settings() if setup.task == "sample" else None
        self.model.register_forward_pre_hook(self._forward_starts)
        self.model.register_forward_hook(self._forward_ends)
        self.losses: list[float] = []

    # -- REPA ------------------------------------------------------------------------------------------------

    def _repa(self):
        """The trainer's REPA pieces (encoders, projectors, the tap) when ``repa.encoders`` is set, with synthetic
        images of ``data.image_size``; for ``repa_targets=cached`` their features, computed once."""
        if not self.config.repa.get("encoders"):
            return None
        config = copy.deepcopy(self.config)
        config.data.name = "imagenet"  # targets from images; "cached" below reads them as a cache would
        size = config.data.image_size
        repa = build_repa(config, self.net, size, config.cond.get("p_uncond", 0.0), self.device)
        generator = torch.Generator().manual_seed(self.setup.seed + 1)
        self.images = (torch.rand(self.setup.batch, 3, size, size, generator=generator) * 2 - 1).to(self.device)
        self.features = None
        if self.variant.repa_targets == "cached":
            self.features = repa.targets(self.images)
            repa.cached = True
        return repa

    # -- data ------------------------------------------------------------------------------------------------

    def _loader(self):
        """The config's dataset through the trainer's data path (StreamItems, on-the-fly VAE encoding)."""
        self.data = prepare_data(self.config, self.device)
        return stream_batches(self.data.dataset, self.setup.seed, self.setup.batch, self.config.data.num_workers,
                              self.device)

    def _next_batch(self) -> tuple[torch.Tensor, dict]:
        if self.batches is None:
            return self.x, self.cond
        batch = next(self.batches)
        x = batch["x"].to(self.device, non_blocking=True)
        if self.data.encode is not None:
            x = self.data.encode(x)
        return x, batch_conditioning(self.net, batch, self.data, 0.0, self.device)

    # -- timing ----------------------------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _forward_starts(self, module, args) -> None:
        self.network_rows += args[0].shape[0]
        self.network_calls += 1
        self._sync()
        self._forward_start = time.perf_counter()

    def _forward_ends(self, module, args, output) -> None:
        self._sync()
        self.network_seconds += time.perf_counter() - self._forward_start

    # -- steps -----------------------------------------------------------------------------------------------

    def train_step(self) -> None:
        x, cond = self._next_batch()
        if self.variant.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast:  # the training step's own loss (diffusion.training.loop.loss_terms)
            loss = loss_terms(self.objective, self.model, x, cond, repa=self.repa, images=self.images,
                              features=self.features)["loss"].mean()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_ema(self.ema, self.net, 0.9999)
        self.losses.append(loss.item())

    def _sample_settings(self) -> dict:
        """The keywords of ``objective.sample``: the setup's sampler, steps and guidance laid over the config's
        ``sample`` section (the one overlay), validated."""
        section = overlay(self.config.sample, {"sampler": self.setup.sampler, "steps": self.setup.nfe,
                                               "guidance_scale": self.setup.guidance})
        return dict(sampler_settings(self.objective, section).kwargs)

    def sample_batch(self) -> None:
        settings = self.sampling
        scale = settings["guidance_scale"]
        null_cond = None
        if scale != 1.0 and "y" in self.cond:
            null_cond = {"y": torch.full_like(self.cond["y"], describe(self.net).null_label)}
        elif scale != 1.0 and "context" in self.cond:
            null_cond = {"context": torch.zeros_like(self.cond["context"])}
        generator = torch.Generator(self.device).manual_seed(self.setup.seed)
        with self.autocast, torch.no_grad():
            self.objective.sample(self.model, self.x.clone(), self.cond, null_cond=null_cond, generator=generator,
                                  **settings)

    def repeat(self) -> dict:
        """One timed repeat: seconds, the time spent inside the network, the rows and forward calls it took."""
        self.network_seconds, self.network_rows, self.network_calls = 0.0, 0, 0
        self._sync()
        start = time.perf_counter()
        if self.setup.task == "train":
            for _ in range(self.setup.steps):
                self.train_step()
        else:
            self.sample_batch()
        self._sync()
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "network_seconds": self.network_seconds, "network_rows": self.network_rows,
                "network_calls": self.network_calls}


def _worker(conn, setup: Setup, variant: Variant) -> None:
    """Build the variant's workload, then answer "repeat" requests until "stop"."""
    try:
        if setup.threads:
            torch.set_num_threads(setup.threads)
        if variant.reuse_memory and setup.device == "cpu":
            reuse_freed_memory()
        if variant.tf32 and setup.device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        work = Workload(setup, variant)
        sampling = work.sampling or {}
        conn.send({"ready": True, "flops": work.flops, "memory_before_mb": current_memory_mb(work.device),
                   "sampler": sampling.get("sampler"), "sampler_steps": sampling.get("steps")})
        while conn.recv() != "stop":
            conn.send({**work.repeat(), "peak_memory_mb": peak_memory_mb(work.device)})
        conn.send({"losses": work.losses})
    except Exception as err:  # noqa: BLE001 -- reported by the parent with the variant's name
        conn.send({"error": f"{type(err).__name__}: {err}"})


# ----------------------------------------------------------------------------------------------------------
# The parent: peak, interleaved repeats, results
# ----------------------------------------------------------------------------------------------------------


def machine_info(device: str) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "accelerate": accelerate.__version__, "platform": platform.platform()}
    if device.startswith("cuda"):
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


def _start(setup: Setup, variant: Variant):
    parent, child = mp.get_context("spawn").Pipe()
    process = mp.get_context("spawn").Process(target=_worker, args=(child, setup, variant), daemon=True)
    process.start()
    return process, parent


def _receive(conn, variant: Variant) -> dict:
    message = conn.recv()
    if "error" in message:
        raise RuntimeError(f"variant {variant.name!r} failed: {message['error']}")
    return message


def run_comparison(setup: Setup, variants: list[Variant], repeats: int = 5, warmup: int = 1,
                   progress=print) -> list[dict]:
    """Every variant's workload, ``warmup`` untimed then ``repeats`` timed repeats, interleaved. One worker at a
    time builds and computes (the others wait on their pipe), so variants never compete for cores."""
    workers = []
    try:
        for variant in variants:  # built one after another, each waited for
            process, conn = _start(setup, variant)
            workers.append((variant, process, conn, _receive(conn, variant)))
        timings = {v.name: [] for v in variants}
        for round_ in range(warmup + repeats):
            for variant, _, conn, _ in workers:
                conn.send("repeat")
                result = _receive(conn, variant)
                if round_ >= warmup:
                    timings[variant.name].append(result)
            progress(f"[benchmark] {setup.task} batch {setup.batch}: round {round_ + 1}/{warmup + repeats} done")
        results = []
        for variant, _, conn, ready in workers:
            conn.send("stop")
            losses = _receive(conn, variant)["losses"]
            results.append(summarize(setup, variant, ready, timings[variant.name], losses))
        return results
    finally:
        for _, process, _, _ in workers:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def summarize(setup: Setup, variant: Variant, ready: dict, timings: list[dict], losses: list[float]) -> dict:
    seconds = statistics.median(t["seconds"] for t in timings)
    network = statistics.median(t["network_seconds"] / t["seconds"] for t in timings)
    images = setup.batch * setup.steps if setup.task == "train" else setup.batch
    # rows through the network per repeat (guided sampling: both halves); backward costs 2 forwards
    flops = ready["flops"] * timings[0]["network_rows"] * (3 if setup.task == "train" else 1)
    result = {"variant": variant.name, "task": setup.task, "batch": setup.batch, **dataclasses.asdict(variant),
              "images_per_s": images / seconds, "seconds_per_repeat": seconds,
              "repeat_seconds": [t["seconds"] for t in timings], "forward_gflops_per_image": ready["flops"] / 1e9,
              "network_share": network, "network_rows_per_repeat": timings[0]["network_rows"],
              "network_calls_per_repeat": timings[0]["network_calls"],
              # sampling: the forward calls that drew one batch (guided: each call holds both halves), the sampler
              # and its steps setting they came from
              "nfe": timings[0]["network_calls"] if setup.task == "sample" else None,
              "sampler": ready.get("sampler"), "sampler_steps": ready.get("sampler_steps"),
              "peak_memory_mb": max(t["peak_memory_mb"] for t in timings),
              "memory_before_mb": ready["memory_before_mb"],
              "first_loss": losses[0] if losses else None}
    result["achieved_tflops"] = flops / seconds / 1e12
    return result


def add_mfu(results: list[dict], peaks: dict) -> None:
    """``mfu``: the FLOP/s the workload needed over the matmul peak of its precision (FLOP/s) on this machine."""
    for r in results:
        peak = peaks.get(r["precision"])
        r["mfu"] = r["achieved_tflops"] * 1e12 / peak if peak and r["achieved_tflops"] else None


def add_speedups(results: list[dict]) -> None:
    """``speedup``: images/s over the ``<precision>-plain`` variant of the same task and batch (else the first)."""
    for r in results:
        same = [o for o in results if o["task"] == r["task"] and o["batch"] == r["batch"]]
        base = next((o for o in same if o["variant"] == f"{r['precision']}-plain"), same[0])
        r["baseline"] = base["variant"]
        r["speedup"] = r["images_per_s"] / base["images_per_s"]


def summary_line(results: list[dict], info: dict) -> str:
    parts = [f"{r['task']} b{r['batch']} {r['variant']} {r['images_per_s']:.2f} img/s x{r['speedup']:.2f}"
             + (f" MFU {100 * r['mfu']:.0f}%" if r.get("mfu") else "")
             + (f" {r['sampler']} steps {r['sampler_steps']} NFE {r['nfe']}" if r.get("nfe") is not None else "")
             for r in results]
    where = info.get("gpu") or f"{info['cpu']} ({info['cpu_count']} cores)"
    return f"[benchmark] {where}: " + "; ".join(parts)


def write_report(path: str, results: list[dict], info: dict, peaks: dict, setup_args: dict) -> None:
    report = {"machine": info, "matmul_peak_tflops": {k: v / 1e12 for k, v in peaks.items()}, "setup": setup_args,
              "results": results}
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
