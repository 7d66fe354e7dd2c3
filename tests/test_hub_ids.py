"""Hub ids wherever a checkpoint path is taken: resolved from a staged Hub cache offline, and one-line errors
for repositories, revisions and tokens the Hub refuses (answered by a local server speaking the Hub's
error protocol)."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import Result
from hubcache import edited_copy, stage
from typer.testing import CliRunner

from adapt.cli import app
from adapt.core.errors import AdaptError

ROOT = Path(__file__).resolve().parents[1]
REPO = "adapt-test/tiny-diffusion"
SECRET = "hf_DoNotLeakThisToken1234567890"


@pytest.fixture
def staged(llama_diffusion: Path, hub_cache: Path) -> Path:
    return stage(llama_diffusion, REPO, hub_cache)


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def sample_json(checkpoint: str, *extra: str) -> dict:
    res = cli("sample", checkpoint, "--prompt", "the river", "--gen-length", "8", "--json", "--dtype",
              "float32", *extra)  # fmt: skip
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_sample_and_verify_take_a_cached_hub_id_offline(llama_diffusion: Path, staged: Path) -> None:
    by_id, by_path = sample_json(REPO), sample_json(str(llama_diffusion))
    assert by_id["texts"] == by_path["texts"] and by_id["checkpoint"] == REPO
    res = cli("verify", REPO)
    assert res.exit_code == 0 and f"verified {REPO}" in res.stdout, res.output


def test_revisions_resolve_to_their_own_snapshot(
    llama_diffusion: Path, hub_cache: Path, tmp_path: Path
) -> None:
    other = edited_copy(llama_diffusion, tmp_path / "other", mask_token="<|mask-v2|>")
    stage(llama_diffusion, REPO, hub_cache)
    stage(other, REPO, hub_cache, revision="v2")
    from adapt.core.checkpoint import load_settings
    from adapt.core.locate import locate

    assert load_settings(locate(REPO)).mask_token == "<|mask|>"
    assert load_settings(locate(REPO, "v2")).mask_token == "<|mask-v2|>"
    res = cli("sample", REPO, "--revision", "v3", "--prompt", "x")
    assert res.exit_code == 1
    assert res.stderr.strip() == (
        f"error: no local directory {REPO} and {REPO!r} at revision 'v3' is not in the Hub cache "
        f"({hub_cache}), and HF_HUB_OFFLINE is set; check the path, or go online once to download it"
    )


def test_library_loader_and_lm_eval_model_take_hub_ids(llama_diffusion: Path, staged: Path) -> None:
    from adapt.evaluation.lm_eval_model import AdaptLM
    from adapt.loading.model import load_diffusion_model

    model, _, settings = load_diffusion_model(REPO, device="cpu")
    local, _, _ = load_diffusion_model(llama_diffusion, device="cpu")
    ids = torch.tensor([[5, 6, settings.mask_token_id, 7]])
    torch.testing.assert_close(model(ids).logits, local(ids).logits, atol=0, rtol=0)
    lm = AdaptLM(pretrained=REPO, device="cpu")
    assert lm.settings == settings
    with pytest.raises(AdaptError, match="at revision 'v9' is not in the Hub cache"):
        AdaptLM(pretrained=REPO, revision="v9", device="cpu")


def test_a_recipe_trains_from_a_hub_id_at_a_revision(
    llama_diffusion: Path, hub_cache: Path, tmp_path: Path
) -> None:
    from test_train import recipe_for

    from adapt.training.run import run

    stage(llama_diffusion, REPO, hub_cache, revision="v1")
    recipe = recipe_for(
        "adapt_text", Path(REPO), tmp_path / "run", "model.revision=v1", "training.max_steps=1"
    )
    _, exported = run(recipe)
    assert json.loads((exported / "training_summary.json").read_text())["steps"] == 1


def test_eval_and_push_take_hub_ids(staged: Path, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("the river runs to the sea and the sea is wide. " * 20)
    res = cli(
        "eval", REPO, "--data", str(text), "--seq-len", "32", "--mc-samples", "2", "--max-sequences", "1"
    )
    assert res.exit_code == 0, res.output
    assert REPO.split("/")[-1] in res.stdout
    res = cli("push", REPO, "someone/republished", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "model.safetensors" in res.stdout and "config.json" in res.stdout


def eval_row(text: Path, out: Path, *extra: str) -> dict:
    """The results of `adapt eval REPO` on `text` (its one row and the recorded config)."""
    res = cli("eval", REPO, "--data", str(text), "--seq-len", "16", "--mc-samples", "2", "--max-sequences",
              "1", "--json", str(out), *extra)  # fmt: skip
    assert res.exit_code == 0, res.output
    results = json.loads(out.read_text())
    return {**results["models"][0], "config": results["config"], "gen_ppl": results.get("gen_ppl")}


def test_eval_reads_each_revision_of_a_hub_id(llama_diffusion: Path, hub_cache: Path, tmp_path: Path) -> None:
    """main records no source model (no judge for generative perplexity), v2 is a block checkpoint that
    does: each eval, generative perplexity included, reads its own revision."""
    stage(edited_copy(llama_diffusion, tmp_path / "main", source_model=None), REPO, hub_cache)
    stage(edited_copy(llama_diffusion, tmp_path / "v2", block_size=4), REPO, hub_cache, revision="v2")
    text = tmp_path / "text.txt"
    text.write_text("the river runs to the sea and the sea is wide. " * 20)
    main = eval_row(text, tmp_path / "main.json")
    assert main["block_size"] is None and main["config"]["revision"] is None
    gen = ["--gen-steps", "2", "--gen-samples", "1", "--gen-length", "4"]
    v2 = eval_row(text, tmp_path / "v2.json", "--revision", "v2", *gen)
    assert v2["block_size"] == 4 and v2["config"]["revision"] == "v2" and v2["model"] == REPO
    assert len(v2["gen_ppl"]) == 1
    res = cli("eval", REPO, "--data", str(text), "--revision", "v3")
    assert res.exit_code == 1
    assert res.stderr.strip() == (
        f"error: no local directory {REPO} and {REPO!r} at revision 'v3' is not in the Hub cache "
        f"({hub_cache}), and HF_HUB_OFFLINE is set; check the path, or go online once to download it"
    )
    res = cli("eval", str(llama_diffusion), "--data", str(text), "--revision", "v2")
    assert res.exit_code == 1 and "--revision v2 applies to Hub ids" in res.stderr, res.output


def test_hub_ids_that_are_not_diffusion_checkpoints_or_missing_get_one_line(
    llama_src: Path, hub_cache: Path
) -> None:
    stage(llama_src, "adapt-test/plain-ar", hub_cache)
    res = cli("sample", "adapt-test/plain-ar", "--prompt", "x")
    assert res.exit_code == 1 and "is not a diffusion checkpoint" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = cli("verify", "adapt-test/nowhere")
    assert res.exit_code == 1 and "not in the Hub cache" in res.stderr
    res = cli("verify", "./adapt-test/nowhere")  # an explicit path is never looked up on the Hub
    assert res.exit_code == 1 and res.stderr.startswith("error: no such checkpoint directory")


# ---------------------------------------------------------------- what the Hub answers online


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers like the Hub for repositories that do not exist, are private, gated, or lack a revision."""

    authorizations: list[str] = []
    """The Authorization header of every request about a repository (empty when none was sent)."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if "/models/" in self.path or "/resolve/" in self.path:  # (huggingface_hub asks other things too)
            FakeHub.authorizations.append(self.headers.get("Authorization", ""))
        if "/missing" in self.path or "/private" in self.path:
            # the Hub answers 401 for a private repo without a token, so that it does not reveal it exists
            self.reply(404 if "/missing" in self.path else 401, "RepoNotFound", "Repository Not Found")
        elif "/gated" in self.path:
            self.reply(403, "GatedRepo", "Access to model is restricted")
        elif "/revision/nope" in self.path:
            self.reply(404, "RevisionNotFound", "Invalid rev id: nope")
        else:
            self.reply(500, "", "Internal Error")

    do_HEAD = do_GET

    def reply(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def online_hub(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from huggingface_hub import constants

    FakeHub.authorizations = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    yield endpoint
    server.shutdown()


def on_the_hub(command: str, repo: str, revision: str | None, tmp_path: Path) -> Result:
    """`adapt sample`, `adapt eval` or `adapt finetune` (the recipe's model.path) run on the Hub id `repo`."""
    text = tmp_path / "text.txt"
    text.write_text("the river runs to the sea. " * 10)
    if command == "finetune":
        recipe = ROOT / "recipes/adapt_text.yaml"
        rev = [f"model.revision={revision}"] if revision else []
        out = f"training.output_dir={tmp_path / 'run'}"
        return cli("finetune", str(recipe), f"model.path={repo}", *rev, out, f"data.path={text}",
                   "logging.report_to=[]", "logging.progress_bar=false")  # fmt: skip
    rev = ["--revision", revision] if revision else []
    if command == "eval":
        return cli("eval", repo, "--data", str(text), *rev)
    return cli("sample", repo, "--prompt", "x", *rev)


def assert_one_line_refusal(res: Result, expected: str) -> None:
    assert res.exit_code == 1, res.output
    assert expected in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output
    assert "huggingface.co/models" not in res.output  # transformers' own lookup, not adapt's
    assert SECRET not in res.output


COMMANDS = ["sample", "eval", "finetune"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    ("repo", "revision", "expected"),
    [
        ("org/missing", None, "no Hub repository 'org/missing' that you can access"),
        ("org/private", None, "it is private: set HF_TOKEN or run `hf auth login`"),
        ("org/gated", None, "Hub repository 'org/gated' is gated: accept its terms"),
        ("org/model", "nope", "Hub repository 'org/model' has no revision 'nope'"),
    ],
)
def test_the_hubs_refusals_are_one_line_without_the_token(
    online_hub: str, command: str, repo: str, revision: str | None, expected: str, tmp_path: Path
) -> None:
    res = on_the_hub(command, repo, revision, tmp_path)
    assert_one_line_refusal(res, expected)
    assert FakeHub.authorizations and set(FakeHub.authorizations) == {f"Bearer {SECRET}"}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_private_repo_without_any_token_is_one_line(
    online_hub: str, command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # no `hf auth login` either
    res = on_the_hub(command, "org/private", None, tmp_path)
    assert_one_line_refusal(res, "it is private: set HF_TOKEN or run `hf auth login`")
    assert FakeHub.authorizations and set(FakeHub.authorizations) == {""}  # asked, without a token
