"""Config files, typed command-line overrides and their errors."""

import re
import runpy
import subprocess
import sys

import pytest

from diffusion.config.cli import parse_command_line
from diffusion.config.loading import apply_override, config_from_json, config_to_json
from diffusion.errors import ConfigError
from tests.helpers import REPO, doc_headings, doc_pages, doc_section

CONFIGS = sorted((REPO / "configs").glob("*.py"))


def test_overrides_keep_types():
    config, flags = parse_command_line([
        "--config=configs/digits_uvit.py", "--config.train.steps=7", "--config.optim.lr=3e-4",
        "--config.data.random_flip=true", "--config.optim.betas=(0.5, 0.6)", "--config.sample.sampler", "ddim",
        "--workdir=/tmp/x"], {"workdir": None})
    assert config.train.steps == 7 and isinstance(config.train.steps, int)
    assert config.optim.lr == 3e-4 and config.data.random_flip is True
    assert config.optim.betas == (0.5, 0.6) and config.sample.sampler == "ddim"
    assert flags["workdir"] == "/tmp/x"


def test_unknown_key_is_named():
    config, _ = parse_command_line(["--config=configs/digits_uvit.py"])
    with pytest.raises(ConfigError, match=r"'train.stpes'.*Did you mean 'steps'"):
        apply_override(config, "train.stpes", "3")
    with pytest.raises(ConfigError, match="no 'nope'"):
        apply_override(config, "nope.x", "3")
    with pytest.raises(ConfigError, match="expected a int"):
        apply_override(config, "train.steps", "many")
    with pytest.raises(ConfigError, match="is a section"):
        apply_override(config, "train", "3")


def test_bad_command_lines():
    with pytest.raises(ConfigError, match="missing --config"):
        parse_command_line([])
    with pytest.raises(ConfigError, match="unknown flag --wrkdir"):
        parse_command_line(["--config=configs/digits_uvit.py", "--wrkdir=x"], {"workdir": None})
    with pytest.raises(ConfigError, match="config file not found"):
        parse_command_line(["--config=configs/nope.py"])


def test_train_py_reports_unknown_key_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--config=configs/digits_uvit.py", "--config.train.lr=1",
                           f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'train.lr'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_loads_builds_and_round_trips(path):
    import torch

    from diffusion.registry import build_model, build_objective

    config, _ = parse_command_line([f"--config={path}"])
    assert config_from_json(config_to_json(config)).to_dict() == config.to_dict()
    with torch.device("meta"):
        build_model(config.model)
    build_objective(config.diffusion)


# The sampler behind each paper number (docs/originals.md#u-vit-sampling, #dit-sampling), as each paper config's
# evaluation default.
# (sampler, steps/NFE, t_end, skip_type, guidance w, guidance channels, diffusion kind, label dropout)
PAPER_SAMPLING = {
    "cifar10_uvit_s2": ("euler_maruyama", 1000, 1e-3, None, 1.0, "all", "vp_sde", 0.0),
    "celeba64_uvit_s4": ("euler_maruyama", 1000, 1e-3, None, 1.0, "all", "vp_sde", 0.0),
    "imagenet64_uvit_m4": ("dpm_solver", 50, 1e-4, "logSNR", 1.0, "all", "vp_sde", 0.0),
    "imagenet64_uvit_l4": ("dpm_solver", 50, 1e-4, "logSNR", 1.0, "all", "vp_sde", 0.0),
    "imagenet256_uvit_l2": ("dpm_solver", 50, 1e-4, "logSNR", 1.4, "all", "vp_sde", 0.15),
    "imagenet256_uvit_h2": ("dpm_solver++", 50, 1e-3, "time_uniform", 1.4, "all", "sd_discrete", 0.1),
    "imagenet512_uvit_l4": ("dpm_solver", 50, 1e-4, "logSNR", 1.7, "all", "vp_sde", 0.15),
    "imagenet512_uvit_h4": ("dpm_solver++", 50, 1e-3, "time_uniform", 1.7, "all", "sd_discrete", 0.1),
    "mscoco_uvit_s2": ("dpm_solver++", 50, 1e-3, "time_uniform", 2.0, "all", "sd_discrete", 0.1),
    "mscoco_uvit_s2_deep": ("dpm_solver++", 50, 1e-3, "time_uniform", 2.0, "all", "sd_discrete", 0.1),
    "imagenet256_dit_xl2": ("ddpm", 250, None, None, 1.5, "3", "iddpm", 0.1),
    "imagenet512_dit_xl2": ("ddpm", 250, None, None, 1.5, "3", "iddpm", 0.1),
    "imagenet256_sit_xl2": ("sde_euler", 250, None, None, 1.5, "3", "transport", 0.1),
}


@pytest.mark.parametrize("name", sorted(PAPER_SAMPLING))
def test_paper_configs_default_to_the_paper_sampler(name):
    from diffusion.registry import label_dropout

    config, _ = parse_command_line([f"--config={REPO / 'configs' / name}.py"])
    s = config.sample
    assert (s.sampler, s.steps, s.t_end, s.skip_type, s.guidance_scale, s.guidance_channels, config.diffusion.kind,
            label_dropout(config, meta_model(config))) == PAPER_SAMPLING[name]
    latent = name.startswith(("imagenet256", "imagenet512", "mscoco"))
    assert bool(config.autoencoder.pretrained) == latent
    assert config.autoencoder.scale_factor == (0.23010 if name.startswith("mscoco") else 0.18215)


UVIT_STATS = "assets/fid_stats/fid_stats_{}.npz"  # U-ViT's statistics files (datasets.py, each ``fid_stat``)
# How each paper number was measured (U-ViT: train*.py / eval*.py / datasets.py; DiT and SiT: sample_ddp.py and ADM's
# evaluator): checkpoint selection (eval.every, eval.n_samples, and its sampler, steps and guidance), the final count
# (eval.final_n_samples for U-ViT's best step; sample.n_samples, the evaluation job), protocol, reference file and
# sampling precision. (every, n, final, selection sampler, steps, w, protocol, reference, precision, tf32, n_samples)
UVIT_PIXEL = (50_000, 10_000, 50_000, "dpm_solver", 50, 1.0, "pytorch_fid")  # train.py: eval_step(10000, 50, dpm)
UVIT_L = (50_000, 10_000, 50_000, "dpm_solver", 50, 1.0, "pytorch_fid")  # train_ldm.py: no guidance
UVIT_H = (50_000, 10_000, 50_000, "dpm_solver++", 50, 1.0, "pytorch_fid")  # train_ldm_discrete.py: no guidance
UVIT_T2I = (50_000, 10_000, 30_000, "dpm_solver++", 50, 2.0, "pytorch_fid")  # train_t2i_discrete.py: cfg_nnet, s = 1
ADM = (0, 10_000, 0, "", 0, None, "adm")  # the final checkpoint only
PAPER_EVALUATION = {
    "cifar10_uvit_s2": (*UVIT_PIXEL, UVIT_STATS.format("cifar10_train_pytorch"), "fp16", False, 50_000),
    "celeba64_uvit_s4": (*UVIT_PIXEL, UVIT_STATS.format("celeba64_train_50000_ddim"), "fp16", False, 50_000),
    "imagenet64_uvit_m4": (*UVIT_PIXEL, UVIT_STATS.format("imagenet64_guided_diffusion"), "fp16", False, 50_000),
    "imagenet64_uvit_l4": (*UVIT_PIXEL, UVIT_STATS.format("imagenet64_guided_diffusion"), "fp16", False, 50_000),
    "imagenet256_uvit_l2": (*UVIT_L, UVIT_STATS.format("imagenet256_guided_diffusion"), "fp16", False, 50_000),
    "imagenet256_uvit_h2": (*UVIT_H, UVIT_STATS.format("imagenet256_guided_diffusion"), "fp16", False, 50_000),
    "imagenet512_uvit_l4": (*UVIT_L, UVIT_STATS.format("imagenet512_guided_diffusion"), "fp16", False, 50_000),
    "imagenet512_uvit_h4": (*UVIT_H, UVIT_STATS.format("imagenet512_guided_diffusion"), "fp16", False, 50_000),
    "mscoco_uvit_s2": (*UVIT_T2I, UVIT_STATS.format("mscoco256_val"), "fp16", False, 30_000),
    "mscoco_uvit_s2_deep": (*UVIT_T2I, UVIT_STATS.format("mscoco256_val"), "fp16", False, 30_000),
    "imagenet256_dit_xl2": (*ADM, "data/VIRTUAL_imagenet256_labeled.npz", "fp32", True, 50_000),
    "imagenet256_dit_xl2_fsdp": (*ADM, "data/VIRTUAL_imagenet256_labeled.npz", "fp32", True, 50_000),
    "imagenet512_dit_xl2": (*ADM, "data/VIRTUAL_imagenet512.npz", "fp32", True, 50_000),  # not ..._labeled
    "imagenet256_sit_xl2": (*ADM, "data/VIRTUAL_imagenet256_labeled.npz", "fp32", True, 50_000),
}


@pytest.mark.parametrize("name", sorted(PAPER_EVALUATION))
def test_paper_configs_measure_as_their_paper(name):
    from diffusion.config.schema import check_values

    config, _ = parse_command_line([f"--config={REPO / 'configs' / name}.py"])
    ev, s = config.eval, config.sample
    assert (ev.every, ev.n_samples, ev.final_n_samples, ev.sampler, ev.steps, ev.guidance_scale, ev.protocol,
            ev.reference, s.precision, s.tf32, s.n_samples) == PAPER_EVALUATION[name]
    check_values(config)
    if ev.every:  # U-ViT scores every checkpoint it saves (save_interval), the last step included
        assert ev.every == config.train.ckpt_every and config.train.steps % ev.every == 0
        assert ev.n_samples < ev.final_n_samples == s.n_samples
        # the selection sampler is the paper's except for the pixel Euler-Maruyama rows (train.py selects with
        # DPM-Solver there too)
        assert (ev.sampler == s.sampler) == (s.sampler != "euler_maruyama")


def test_reproduction_table_names_each_configs_protocol_and_reference():
    """README's reproduction table: every row's protocol and reference file are its config's."""
    section = doc_section("Reproduction table")
    assert section in (REPO / "README.md").read_text()  # the table a newcomer meets first
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and "`" in line]
    names = {"pytorch_fid": "pytorch-fid", "adm": "ADM"}
    checked = set()
    for row in rows:
        if row[5] == "-":  # an anchor row: a number this framework's tools aim at, with no config of its own yet
            assert row[6].startswith("anchor"), row
            continue
        (name,) = re.findall(r"`(\w+)`", row[5])
        if name not in PAPER_EVALUATION:
            continue
        config, _ = parse_command_line([f"--config={REPO / 'configs' / name}.py"])
        assert row[4] == f"{names[config.eval.protocol]}: `{config.eval.reference.rsplit('/', 1)[-1]}`", row
        checked.add(name)
    assert checked == set(PAPER_SAMPLING)


def test_every_paper_row_has_its_evaluation():
    """Every config with a paper number (the sampler table) states how that number was measured."""
    assert set(PAPER_SAMPLING) | {"imagenet256_dit_xl2_fsdp"} == set(PAPER_EVALUATION)


@pytest.mark.parametrize("name, steps", [("cifar10_uvit_s2", 500_000), ("celeba64_uvit_s4", 500_000),
                                         ("imagenet64_uvit_m4", 300_000), ("imagenet64_uvit_l4", 300_000),
                                         ("imagenet256_uvit_l2", 300_000), ("imagenet256_uvit_h2", 500_000),
                                         ("imagenet512_uvit_l4", 500_000), ("imagenet512_uvit_h4", 500_000),
                                         ("mscoco_uvit_s2", 1_000_000), ("mscoco_uvit_s2_deep", 1_000_000)])
def test_uvit_training_steps_follow_the_paper(name, steps):
    config, _ = parse_command_line([f"--config={REPO / 'configs' / name}.py"])
    assert config.train.steps == steps


def test_dit_recipe_in_full():
    config, _ = parse_command_line([f"--config={REPO / 'configs/imagenet256_dit_xl2.py'}"])
    assert (config.train.steps, config.train.batch_size, config.train.ckpt_every, config.train.log_every) == (
        7_000_000, 256, 50_000, 100)
    assert config.train.mixed_precision == "no" and config.train.tf32
    assert (config.optim.lr, config.optim.weight_decay, config.optim.warmup_steps) == (1e-4, 0.0, 0)


def test_sit_recipe_in_full():
    """SiT's train.py: AdamW 1e-4, no decay, global batch 256, EMA 0.9999, 1400 epochs of ImageNet's 1,281,167
    images in full batches, checkpoints every 50K; linear path, velocity; the DiT-XL/2 backbone and DiT's latents."""
    sit, _ = parse_command_line([f"--config={REPO / 'configs/imagenet256_sit_xl2.py'}"])
    dit, _ = parse_command_line([f"--config={REPO / 'configs/imagenet256_dit_xl2.py'}"])
    assert (sit.train.steps, sit.train.batch_size, sit.train.ckpt_every, sit.train.ema_decay) == (
        1400 * (1_281_167 // 256), 256, 50_000, 0.9999)
    assert (sit.optim.lr, sit.optim.weight_decay, sit.optim.warmup_steps) == (1e-4, 0.0, 0)
    assert (sit.diffusion.kind, sit.diffusion.path, sit.diffusion.prediction) == ("transport", "linear", "velocity")
    assert sit.diffusion.get("time_scale", 1.0) == 1.0  # SiT's time input: t in [0, 1]
    s = sit.sample  # SiT's sample.py SDE flags behind FID 2.06: --diffusion-form sigma --last-step Mean
    assert (s.diffusion_form, s.diffusion_norm, s.last_step, s.last_step_size) == ("sigma", 1.0, "mean", 0.04)
    assert sit.model.preset == "SiT-XL/2"
    assert {**sit.model.to_dict(), "preset": "DiT-XL/2"} == dit.model.to_dict()
    assert sit.data.to_dict() == dit.data.to_dict() and sit.autoencoder.to_dict() == dit.autoencoder.to_dict()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_configs_write_out_their_recipes(path):
    """Every value of a config's recipe is readable in the config file: from the project it imports base_config
    only (no shared recipe functions), or, for a variant, load_config to start from the sibling config it names."""
    import ast

    imported = {(node.module, alias.name) for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ImportFrom) for alias in node.names}
    imported |= {(alias.name, None) for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Import) for alias in node.names}
    project = {(m, n) for m, n in imported if m.split(".")[0] in ("diffusion", "configs", "uvit", "dit")}
    assert project in ({("diffusion.config.schema", "base_config")}, {("diffusion.config.loading", "load_config")})
    if project == {("diffusion.config.loading", "load_config")}:
        (base,) = re.findall(r'with_name\("(\w+\.py)"\)', path.read_text())
        assert (path.parent / base).is_file() and "load_config" not in (path.parent / base).read_text()


def test_pointers_into_docs_originals_resolve():
    """Comments, configs and tests cite docs/originals.md by section: every cited anchor is a heading there."""
    import re

    doc = (REPO / "docs" / "originals.md").read_text()
    anchors = {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
               for title in re.findall(r"^#+ (.+)$", doc, flags=re.M)}
    cited = set(re.findall(r"\]\(#([\w-]+)\)", doc))  # the page's own links
    folders = ("configs", "diffusion", "uvit", "dit", "scripts", "tests", "docs")
    files = [*REPO.glob("*.py"), *REPO.glob("*.md"), *(p for f in folders for p in (REPO / f).rglob("*.*"))]
    for path in (p for p in files if p.suffix in (".py", ".md")):
        for line in path.read_text().splitlines():
            if "originals.md#" in line:
                cited |= set(re.findall(r"#([a-z][\w-]*)", line[line.index("originals.md#"):]))
    assert len(cited) > 10 and cited <= anchors, sorted(cited - anchors)


def test_documentation_links_resolve():
    """README.md and docs/*.md: every relative link names an existing file, every #anchor a heading of its page, and
    the README links every docs page."""
    def slug(title):
        return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")

    pages = doc_pages()
    linked = set()
    for page in pages:
        text = page.read_text()
        prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # links in code blocks are not links
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.name}: link to {target}: no such file"
            if anchor and dest.suffix == ".md":
                assert anchor in {slug(t) for _, _, t in doc_headings(dest.read_text())}, f"{page.name}: {target}"
            if page.name == "README.md":
                linked.add(dest)
    assert len(pages) > 5 and set(pages[1:]) <= linked, sorted(p.name for p in set(pages[1:]) - linked)


def meta_model(config):
    """The config's backbone on the meta device (nothing allocated)."""
    import torch

    from diffusion.registry import build_model

    with torch.device("meta"):
        return build_model(config.model)


def test_dit_label_dropout_has_one_source_of_truth():
    from diffusion.registry import label_dropout

    config, _ = parse_command_line(["--config=configs/digits_dit.py", "--config.model.class_dropout_prob=0.2"])
    assert label_dropout(config, meta_model(config)) == 0.2
    config, _ = parse_command_line(["--config=configs/digits_dit.py", "--config.cond.p_uncond=0.3"])
    with pytest.raises(ConfigError, match="disagrees with the backbone's own rate 0.1 .DiT: model.class_dropout_prob"):
        label_dropout(config, meta_model(config))


def test_model_keys_override_presets():
    """Any constructor keyword of the backbone can be set on a preset config; explicit keys win over the preset."""
    from diffusion.registry import resolve_model_kwargs

    config, _ = parse_command_line(["--config=configs/cifar10_uvit_s2.py", "--config.model.embed_dim=64",
                                    "--config.model.depth=2", "--config.model.skip_mode=add"])
    _, kwargs = resolve_model_kwargs(config.model)
    assert (kwargs["embed_dim"], kwargs["depth"], kwargs["skip_mode"], kwargs["num_heads"]) == (64, 2, "add", 8)
    with pytest.raises(ConfigError, match="model.embed_dimm"):
        apply_override(config, "model.embed_dimm", "3")


BUILDER_VALUES = {"beta_min": "0.1", "beta_max": "20.0", "num_steps": "1000", "linear_start": "0.00085",
                  "linear_end": "0.012", "beta_schedule": "linear", "learn_sigma": "True", "timestep_respacing": "",
                  "sigma_small": "False", "clip_denoised": "False"}


@pytest.mark.parametrize("kind", ["vp_sde", "sd_discrete", "iddpm"])
def test_every_diffusion_setting_is_settable_and_accepted_by_its_builder(kind):
    """Settings a config file leaves at the builder's default can still be set from the command line."""
    import inspect

    from diffusion.config.loading import DIFFUSION_KEYWORDS
    from diffusion.objectives.iddpm import build_iddpm
    from diffusion.registry import build_objective

    flags = [f"--config.diffusion.{key}={BUILDER_VALUES[key]}" for key in DIFFUSION_KEYWORDS[kind]]
    config, _ = parse_command_line(["--config=configs/digits_uvit.py", f"--config.diffusion.kind={kind}", *flags])
    assert set(DIFFUSION_KEYWORDS[kind]) <= set(config.diffusion)
    build_objective(config.diffusion)  # the builders refuse settings they do not know
    if kind == "iddpm":
        assert set(DIFFUSION_KEYWORDS[kind]) == set(inspect.signature(build_iddpm).parameters)
    with pytest.raises(ConfigError, match=r"diffusion has no 'beta_mn'.*Known keys there: .*kind"):
        apply_override(config, "diffusion.beta_mn", "1")


def test_model_keywords_are_checked_against_the_backbone():
    config, _ = parse_command_line(["--config=configs/digits_dit.py", "--config.model.learn_sigma=False"])
    assert config.model.learn_sigma is False
    with pytest.raises(ConfigError, match=r"model has no 'hiden_size'.*Did you mean 'hidden_size'"):
        apply_override(config, "model.hiden_size", "3")


def test_switch_flags_take_no_value():
    flags = {"workdir": None, "allow_config_change": False}
    _, values = parse_command_line(["--config=configs/digits_uvit.py", "--allow_config_change", "--workdir", "w"],
                                   flags)
    assert values["allow_config_change"] is True and values["workdir"] == "w"
    _, values = parse_command_line(["--config=configs/digits_uvit.py", "--allow_config_change=false"], flags)
    assert values["allow_config_change"] is False
    with pytest.raises(ConfigError, match="bad value for --allow_config_change"):
        parse_command_line(["--config=configs/digits_uvit.py", "--allow_config_change=maybe"], flags)


# ----------------------------------------------------------------------------------------------------------
# The one command-line layer of every entry point
# ----------------------------------------------------------------------------------------------------------


def _command():
    from diffusion.config.cli import Command, Flag

    return Command("Demo.", config="optional", positional="PATH ...", positional_help="files", flags=(
        Flag("save_stats", metavar="OUT.npz", help="where"), Flag("steps", 3, int), Flag("t_end", type=float),
        Flag("ema", True, bool), Flag("quick", False, bool), Flag("prompts", many="+"),
        Flag("batch", [8], int, many="+"), Flag("options", many="*", choices=("plain", "fast")),
        Flag("variant", many="append"), Flag("ckpt", required=True, help="the checkpoint")))


def test_flags_one_syntax_one_value_parser():
    from diffusion.config.cli import parse_arguments

    args = parse_arguments(["a.npz", "--save-stats", "s.npz", "--steps=7", "--t_end", "1e-3", "--ema", "NO",
                            "--quick", "--prompts", "a red bus", "two dogs", "--batch", "8", "32", "--options",
                            "--variant=x:a=1", "--variant", "y:b=2", "--ckpt=c", "b.npz", "--config.train.steps=2",
                            "--config.optim.lr", "0.1"], _command())
    assert (args.save_stats, args.steps, args.t_end, args.ema, args.quick) == ("s.npz", 7, 1e-3, False, True)
    assert args.prompts == ["a red bus", "two dogs"] and args.batch == [8, 32] and args.options == []
    assert args.variant == ["x:a=1", "y:b=2"] and args.positional == ["a.npz", "b.npz"]
    assert args.overrides == [("train.steps", "2"), ("optim.lr", "0.1")] and args.config_path is None
    defaults = parse_arguments(["--ckpt=c"], _command())
    assert (defaults.steps, defaults.ema, defaults.batch, defaults.options, defaults.variant) == (3, True, [8], None,
                                                                                                  None)
    for word, value in (("true", True), ("1", True), ("yes", True), ("False", False), ("0", False), ("no", False)):
        assert parse_arguments(["--ckpt=c", f"--ema={word}"], _command()).ema is value  # the config's words


@pytest.mark.parametrize("argv, message", [
    (["--ckpt=c", "--steps=many"], "bad value for --steps: expected a int, got 'many'"),
    (["--ckpt=c", "--ema=on"], "bad value for --ema: expected a boolean, got 'on'"),
    (["--ckpt=c", "--options", "slow"], "bad value for --options: expected one of plain, fast, got 'slow'"),
    (["--ckpt=c", "--stpes=1"], "unknown flag --stpes; known flags: --config=FILE, --config.key=value, --save_stats"),
    (["--ckpt=c", "--prompts"], "flag --prompts needs at least one value"),
    (["--ckpt=c", "--steps"], "flag --steps needs a value"),
    ([], "missing --ckpt=TEXT (the checkpoint)"),
])
def test_flag_errors_name_the_flag(argv, message):
    from diffusion.config.cli import parse_arguments

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_arguments(argv, _command())


def test_run_main_help_and_the_one_exit_for_user_errors(capsys):
    from diffusion.config.cli import run_main
    from diffusion.errors import CheckpointError, InputNotFoundError

    def fail(error):
        def body(args):
            raise error
        return body

    assert run_main(_command(), ["--ckpt=c"], fail(InputNotFoundError("checkpoint not found: c"))) == 2
    assert capsys.readouterr().err == "error: checkpoint not found: c\n"
    assert run_main(_command(), ["--ckpt=c"], fail(CheckpointError("damaged"))) == 2
    assert run_main(_command(), ["--steps=x"], fail(None)) == 2 and "bad value for --steps" in capsys.readouterr().err
    assert run_main(_command(), ["--help", "--config=configs/digits_uvit.py", "--config.train.steps=9"], None) == 0
    out = capsys.readouterr().out
    assert out.startswith("Demo.\n\nArguments:\n  PATH ...") and "\nFlags:\n" in out
    assert "--save_stats=OUT.npz" in out and "--batch INT [INT ...]" in out
    assert "--ckpt=TEXT" in out and "(required)" in out and "--config.train.steps=9" in out
    with pytest.raises(ValueError):  # not a user error: a bug shows its traceback
        run_main(_command(), ["--ckpt=c"], fail(ValueError("bug")))


def test_every_user_error_is_a_user_error_and_keeps_its_builtin_base():
    import inspect

    import diffusion.errors as errors

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) > 10
    assert all(issubclass(c, errors.UserError) for c in classes)
    assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.InputNotFoundError, FileNotFoundError)
    assert issubclass(errors.DatasetNotFoundError, FileNotFoundError)
    assert issubclass(errors.CheckpointSaveError, OSError) and issubclass(errors.NonFiniteLossError, FloatingPointError)


ENTRY_POINTS = ["train.py", "sample.py", "eval_fid.py", "scripts/benchmark.py", "scripts/ablation.py",
                "scripts/extract_latents.py", "scripts/extract_coco.py", "scripts/coco_prompts.py",
                "scripts/reconstruct_ema.py", "scripts/sweep.py", "scripts/plot_runs.py"]


@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_every_entry_point_declares_its_command_line_in_the_one_layer(path):
    import ast

    from diffusion.config.cli import help_text

    tree = ast.parse((REPO / path).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "argparse" not in imported and "run_main" in imported, path
    module = runpy.run_path(str(REPO / path), run_name="not_main")
    text = help_text(module["COMMAND"])
    assert text.startswith(module["__doc__"].strip()) and "--help" in text
    assert all(f"--{flag.name}" in text for flag in module["COMMAND"].flags)


def test_library_code_reads_no_command_line():
    users = [p for p in (REPO / "diffusion").rglob("*.py") if re.search(r"^\s*(import argparse|from argparse)",
                                                                         p.read_text(), flags=re.M)]
    assert [p.relative_to(REPO).as_posix() for p in users] == ["diffusion/weights.py"]  # DiT's pickled Namespace
    # flags are the entry points' (train.py, scripts/...): below them only the command-line layer knows of flags
    cli = r"^\s*(from diffusion\.config\.cli import|from diffusion\.config import cli|import diffusion\.config\.cli)"
    flag_users = [p.relative_to(REPO).as_posix() for p in (REPO / "diffusion").rglob("*.py")
                  if p.parent.name != "config" and re.search(cli, p.read_text(), flags=re.M)]
    assert flag_users == []


def test_diffusion_keywords_are_the_builders_signatures():
    import inspect

    from diffusion.config.loading import DIFFUSION_KEYWORDS
    from diffusion.objectives import iddpm, transport, vp
    from diffusion.registry import OBJECTIVES, build_objective

    builders = {"vp_sde": vp.build_vp_sde, "sd_discrete": vp.build_sd_discrete, "iddpm": iddpm.build_iddpm,
                "transport": transport.build_transport}
    assert set(OBJECTIVES) == set(DIFFUSION_KEYWORDS) == set(builders)
    for kind, builder in builders.items():
        assert DIFFUSION_KEYWORDS[kind] == tuple(inspect.signature(builder).parameters)
    with pytest.raises(ConfigError, match="unknown diffusion settings for 'vp_sde': \\['num_steps'\\]"):
        build_objective({"kind": "vp_sde", "num_steps": 10})


# U-ViT + REPA (no paper run: configs/imagenet256_uvit_h2_repa.py, configs/mscoco_uvit_s2_repa.py document each
# choice). (parent config, blocks in/mid/out, repa.layer, sampler, steps, guidance w, guidance t interval)
UVIT_REPA = {
    "imagenet256_uvit_h2_repa": ("imagenet256_uvit_h2", (14, 1, 14), 8, "repa_sde", 250, 1.8, (0.3, 1.0)),
    "mscoco_uvit_s2_repa": ("mscoco_uvit_s2", (6, 1, 6), 4, "repa_euler", 50, 1.5, (0.0, 1.0)),
}


@pytest.mark.parametrize("name", sorted(UVIT_REPA))
def test_uvit_repa_configs(name):
    """Transport objective (linear, velocity, U-ViT's time token fed 999 t), REPA's DINOv2-B / 2048 / 0.5 on an early
    in-block that the tap can hold, the parent's backbone, data and recipe unchanged, and samplers the objective
    runs."""
    import torch

    from diffusion.config.schema import check_values
    from diffusion.evaluation.training import selection_sample_config
    from diffusion.objectives.repa import register_tap
    from diffusion.registry import build_model, build_objective, tap_blocks
    from diffusion.sampling.settings import preview_settings, sampler_settings

    parent_name, (n_in, n_mid, n_out), layer, sampler, steps, w, window = UVIT_REPA[name]
    config, _ = parse_command_line([f"--config={REPO / 'configs' / name}.py"])
    parent, _ = parse_command_line([f"--config={REPO / 'configs' / parent_name}.py"])
    d = config.diffusion
    assert (d.kind, d.path, d.prediction, d.loss_weight, d.time_sampling, d.time_scale, d.time_direction) == (
        "transport", "linear", "velocity", "none", "uniform", 999.0, "sit")
    r = config.repa
    assert (r.encoders, r.layer, r.projector_dim, r.coeff, r.stop_at_step, r.legacy) == (
        "dinov2-vit-b", layer, 2048, 0.5, 0, False)
    assert 1 <= r.layer <= n_in  # an in-block: before the mid block and the long skips
    for section in ("model", "cond", "data", "autoencoder", "text_encoder", "optim", "train"):
        assert config[section].to_dict() == parent[section].to_dict(), section
    s = config.sample
    assert (s.sampler, s.steps, s.guidance_scale, (s.guidance_t_lo, s.guidance_t_hi)) == (sampler, steps, w, window)
    assert (config.eval.protocol, config.eval.reference, config.eval.every) == (
        parent.eval.protocol, parent.eval.reference, parent.eval.every)
    check_values(config)
    with torch.device("meta"):
        model = build_model(config.model)
    assert (len(model.in_blocks), 1, len(model.out_blocks)) == (n_in, n_mid, n_out)
    register_tap(tap_blocks(model), r.layer).remove()
    with pytest.raises(ValueError, match="REPA's layer must lie in"):
        register_tap(tap_blocks(model), n_in + n_mid + n_out + 1)
    objective = build_objective(config.diffusion)
    for settings in (config.sample, preview_settings(config), selection_sample_config(config)):
        kwargs = sampler_settings(objective, settings).kwargs
        # the objective's own refusals (t_end, skip_type of the parent's DPM-Solver++): a zero network runs them
        out = objective.sample(lambda x, t, **cond: torch.zeros_like(x), torch.randn(2, 4, 2, 2), {}, **kwargs)
        assert out.shape == (2, 4, 2, 2) and torch.isfinite(out).all()
