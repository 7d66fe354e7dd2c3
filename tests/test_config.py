"""Recipes: every shipped recipe validates; unknown keys, wrong types and bad values fail clearly."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from adapt.core.errors import AdaptError
from adapt.training.config import (
    LoraSettings,
    Recipe,
    TrainingConfig,
    apply_overrides,
    load_recipe,
    recipe_from_dict,
    save_recipe,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
ACCELERATE = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))

MINIMAL = {"model": {"path": "some/model"}, "data": {"path": "data.txt"}}


def test_recipes_are_shipped() -> None:
    names = {p.stem for p in RECIPES}
    assert {"adapt_text", "sft_chat", "lora_chat", "multi_process"} <= names
    assert {p.stem for p in ACCELERATE} == {"ddp", "fsdp", "deepspeed", "multi_node_fsdp"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_points_at_shipped_data(path: Path) -> None:
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    if recipe.data.path.startswith("recipes/"):  # (the quickstart's data is prepared by adapt.demo)
        assert (ROOT / recipe.data.path).is_file(), "recipes must run offline on shipped data"
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    launch = [line for line in header if "finetune.py recipes/" in line]
    assert launch and all(f"recipes/{path.name}" in line for line in launch), (
        "header gives the launch command"
    )


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.stem)
def test_accelerate_configs_are_valid(path: Path) -> None:
    from accelerate.utils import DistributedType

    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] in DistributedType.__members__
    assert config["num_processes"] >= 2
    assert "accelerate launch --config_file recipes/accelerate/" in path.read_text().splitlines()[1]


def test_shipped_data_is_real_text() -> None:
    stories = (ROOT / "recipes/data/stories.txt").read_text().split("\n\n")
    assert len(stories) >= 50 and all(len(s.split()) > 15 for s in stories)
    chat = (ROOT / "recipes/data/chat.jsonl").read_text().splitlines()
    assert len(chat) >= 150


def test_defaults_fill_in() -> None:
    recipe = recipe_from_dict(MINIMAL)
    assert recipe.training == TrainingConfig()
    assert recipe.lora is None and recipe.push_to_hub is None
    assert recipe.data.mode == "text"


def test_unknown_key_lists_the_valid_keys() -> None:
    with pytest.raises(AdaptError) as e:
        recipe_from_dict({**MINIMAL, "training": {"lrr": 1.0}})
    msg = str(e.value)
    assert "unknown key 'training.lrr'" in msg
    for key in ("lr", "batch_size", "grad_accumulation", "output_dir"):
        assert key in msg
    with pytest.raises(AdaptError, match="unknown key 'optimiser'.*valid keys in the recipe: model, data"):
        recipe_from_dict({**MINIMAL, "optimiser": {}})
    with pytest.raises(AdaptError, match="unknown key 'data.colum'.*text_column"):
        recipe_from_dict({**MINIMAL, "data": {"path": "x", "colum": "t"}})


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ({"training": {"batch_size": "eight"}}, None, "training.batch_size must be an integer"),
        ({"training": {"batch_size": 2.5}}, None, "training.batch_size must be an integer"),
        ({"training": {"resume": "yes"}}, None, "training.resume must be true or false"),
        ({"training": {"schedule": "step"}}, None, "training.schedule must be one of 'cosine', 'linear'"),
        ({"training": {"max_grad_norm": "big"}}, None, "training.max_grad_norm must be a number"),
        ({"lora": {"target_modules": 3}}, None, "lora.target_modules must be a list or one of 'auto'"),
        ({"training": []}, None, "training must be a mapping"),
        ({"logging": {"report_to": ["tensorbored"]}}, None, "logging.report_to\\[0\\] must be one of"),
    ],
)
def test_wrong_types_fail_clearly(section: dict, value: object, message: str) -> None:
    with pytest.raises(AdaptError, match=message):
        recipe_from_dict({**MINIMAL, **section})


def test_missing_required_key() -> None:
    with pytest.raises(AdaptError, match="missing required key 'model.path'.*valid keys in model"):
        recipe_from_dict({"model": {}, "data": {"path": "x"}})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training.batch_size=0"], "training.batch_size must be >= 1"),
        (["training.lr=-1"], "training.lr must be > 0"),
        (["training.betas=[0.9]"], "training.betas must be two numbers"),
        (["diffusion.eps=1.5"], "diffusion.eps must be in"),
        (["lora.r=0"], "lora.r and lora.alpha must be >= 1"),
        (["data.max_length=1"], "data.max_length must be at least 2"),
        (["training.lr"], "must look like section.key=value"),
    ],
)
def test_validation_in_post_init(overrides: list[str], message: str) -> None:
    with pytest.raises(AdaptError, match=message):
        recipe_from_dict(apply_overrides(MINIMAL, overrides))


def test_overrides_are_yaml_typed() -> None:
    raw = apply_overrides(
        MINIMAL,
        [
            "training.lr=3e-4",  # no dot: PyYAML says string, the float field still takes it
            "training.max_steps=12",
            "training.max_grad_norm=null",
            "diffusion.low_discrepancy=false",
            "lora.r=8",  # creates the section
            "lora.target_modules=[q_proj, v_proj]",
            "model.path=other/model",
            "push_to_hub=me/model",
            "training.mixed_precision=no",  # YAML 1.1 reads `no` as false; the choice "no" is meant
        ],
    )
    recipe = recipe_from_dict(raw)
    assert recipe.training.lr == pytest.approx(3e-4) and isinstance(recipe.training.lr, float)
    assert recipe.training.max_steps == 12 and recipe.training.max_grad_norm is None
    assert recipe.diffusion.low_discrepancy is False
    assert recipe.lora == LoraSettings(r=8, target_modules=["q_proj", "v_proj"])
    assert recipe.model.path == "other/model" and recipe.push_to_hub == "me/model"
    assert recipe.training.mixed_precision == "no"
    assert MINIMAL == {"model": {"path": "some/model"}, "data": {"path": "data.txt"}}, "input not mutated"
    assert recipe_from_dict(apply_overrides({**MINIMAL, "lora": {"r": 4}}, ["lora=null"])).lora is None


def test_resolved_recipe_round_trips(tmp_path: Path) -> None:
    recipe = load_recipe(ROOT / "recipes/lora_chat.yaml", ["training.max_steps=7", "lora.r=4"])
    save_recipe(recipe, tmp_path / "recipe.yaml")
    text = (tmp_path / "recipe.yaml").read_text()
    assert "max_steps: 7" in text and "eps: 0.001" in text, "every default is written out"
    assert load_recipe(tmp_path / "recipe.yaml") == recipe


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(AdaptError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(AdaptError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(AdaptError, match="must hold a mapping"):
        load_recipe(tmp_path / "list.yaml")


def launch_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    """What `accelerate launch ARGV` would hand torchrun: its parsed arguments and the environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    return args, prepare_multi_gpu_env(args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_multi_node_config_starts_each_machine_with_its_rank() -> None:
    config = str(ROOT / "recipes/accelerate/multi_node_fsdp.yaml")
    port = str(free_port())
    for rank in (0, 1):
        argv = ["--config_file", config, "--machine_rank", str(rank), "--main_process_ip", "10.1.2.3",
                "--main_process_port", port, "finetune.py", "recipes/multi_process.yaml"]  # fmt: skip
        args, env = launch_args(argv)
        assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", rank)
        assert args.rdzv_endpoint == f"10.1.2.3:{port}"  # torchrun's rendezvous on machine 0
        assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"


def test_the_slurm_script_launches_one_accelerate_per_node(tmp_path: Path) -> None:
    """The sbatch script run with a 3-node allocation's environment: `srun` and `accelerate` stand-ins
    record the command each node would run, which accelerate's own parser then turns into torchrun's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\ngpu-c\\n'\n")
    (bin_dir / "srun").write_text(  # one task per node: run the command as node 2 would
        '#!/bin/sh\nshift\nexport SLURM_NODEID=2\n"$@"\n'
    )
    (bin_dir / "accelerate").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/argv\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[a-c]",
           "SLURM_NNODES": "3"}  # fmt: skip
    script = ROOT / "recipes/slurm/finetune.sbatch"
    proc = subprocess.run(["bash", str(script), "recipes/multi_process.yaml", "training.max_steps=5"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "argv").read_text().split()
    assert argv[0] == "launch" and argv[-3:] == [
        "finetune.py",
        "recipes/multi_process.yaml",
        "training.max_steps=5",
    ]
    argv[argv.index("--main_process_port") + 1] = str(free_port())
    args, _ = launch_args(argv[1:])
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("3", "8", 2)
    assert args.rdzv_endpoint.startswith("gpu-a:")
