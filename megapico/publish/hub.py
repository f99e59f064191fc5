"""Publish a megapico run to the Hugging Face Hub the way pico-train does, so pico-analyze's remote mode reads it.

One commit per artifact per checkpoint on the branch named after the run, with pico-train's titles and paths, per
step N ascending: `Saving HF Model -- Step N` (config.json, model.safetensors, pico_decoder.py: the verified pico HF
export), at the first step `Saving Tokenizer -- Step N` and `Saving Training Config -- Step N` (training_config.yaml),
`Saving megapico Training State -- Step N` (megapico_state/: the checkpoint's own files and manifest, what resuming
needs; pico-train's fabric_state/ is left to pico-train's format), `Saving Evaluation Results -- Step N`
(eval_results/ as it stood at step N), `Saving Learning Dynamics Data (train|val) -- Step N`.

Idempotent: the branch's commit titles say what is there and only the missing artifacts are sent, so a publication
killed half-way completes on the next call. A checkpoint is sent only once its manifest verifies (sha256); nothing in
the run directory changes except the export cache runs/RUN/.publish/, removed once everything is on the Hub. Network
errors, timeouts, 429 and 5xx are retried with exponential backoff; then one line (PublishError) says what failed.
Each commit names the branch head it was built on (parent_commit), so two publishers never send a title twice.
"""

import hashlib
import json
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_session
from huggingface_hub.errors import HfHubHTTPError

from megapico.checkpoint.manifest import MANIFEST, read_manifest, verify_checkpoint
from megapico.checkpoint.paths import CheckpointError, refuse_links
from megapico.checkpoint.training_state import STATE_FILE, step_of
from megapico.convert.checkpoint_reader import PRUNED_EXPORT, checkpoint_config, load_checkpoint
from megapico.convert.convert import export_checkpoint, pico_training_config, step_directories
from megapico.convert.hf_export import MODELLING_FILE, TOKENIZER_FILES
from megapico.publish.background import TRAINING_STATES

STATE_DIR = "megapico_state"  # never pico-train's fabric_state/: that path holds its own format
CACHE_DIR = ".publish"
MODEL_FILES = ("config.json", "model.safetensors")
KINDS = ("activations", "weights", "gradients")
MAX_BACKOFF_S = 300.0
TRANSIENT_STATUS = (408, 409, 412, 429)  # 409/412: the branch moved under us; re-read it and try again
TRANSIENT_ERRORS = ("TimeoutException", "NetworkError", "RemoteProtocolError")  # httpx's, by name (httpx/httpx2)


def model_title(step: int) -> str:
    return f"Saving HF Model -- Step {step}"


def tokenizer_title(step: int) -> str:
    return f"Saving Tokenizer -- Step {step}"


def config_title(step: int) -> str:
    return f"Saving Training Config -- Step {step}"


def state_title(step: int) -> str:
    return f"Saving megapico Training State -- Step {step}"


def eval_title(step: int) -> str:
    return f"Saving Evaluation Results -- Step {step}"


def dynamics_title(split: str, step: int) -> str:
    return f"Saving Learning Dynamics Data ({split}) -- Step {step}"


def main_title(branch: str, step: int) -> str:
    return f"Update main to {branch} -- Step {step}"


class PublishError(RuntimeError):
    """Publishing stopped: one line naming what failed, after the retries."""


Files = dict[str, Path | bytes]  # path in the repository -> local file or content


@dataclass
class Artifact:
    title: str
    step: int
    files: Callable[[], Files]  # built only when the title is missing (verification, export)
    replaces: tuple[str, ...] = ()  # folders whose other files on the branch are deleted in the same commit


@dataclass
class Checkpoint:
    directory: Path
    step: int
    manifest: dict | None  # None: megapico_state.json written, manifest not yet (a save in progress)

    @property
    def full(self) -> bool:
        return (self.manifest or {}).get("kind") == "full"


def _one_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    if isinstance(err, HfHubHTTPError) and err.response is not None and err.response.status_code in (401, 403):
        text += " (set HF_TOKEN, or log in with `hf auth login`, with write access to the repository)"
    return text


def _transient(err: BaseException) -> bool:
    """Worth another attempt: a network error or timeout, 5xx, 429, or the branch having moved."""
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else None
        return status is None or status >= 500 or status in TRANSIENT_STATUS
    if any(cls.__name__ in TRANSIENT_ERRORS for cls in type(err).__mro__) or isinstance(err, (ConnectionError,
                                                                                              TimeoutError)):
        return True
    return err.__cause__ is not None and _transient(err.__cause__)  # the LFS upload wraps its error in RuntimeError


@contextmanager
def request_timeout(seconds: float) -> Iterator[None]:
    """Give every request of huggingface_hub's shared HTTP client a timeout per network operation (it has none, so a
    hanging server would hang the publisher): set on each request by an event hook, removed afterwards."""
    timeout = {"connect": seconds, "read": seconds, "write": seconds, "pool": seconds}

    def hook(request) -> None:  # noqa: ANN001
        request.extensions["timeout"] = timeout

    hooks = get_session().event_hooks["request"]
    hooks.append(hook)
    try:
        yield
    finally:
        hooks.remove(hook)


def run_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """The checkpoints of a run with megapico_state.json written, by step (the run directory holds no link:
    publish_run checked it whole with refuse_links)."""
    return [Checkpoint(path, step_of(path.name), read_manifest(path)) for path in
            step_directories(run_dir, "no checkpoints to publish")]


@dataclass
class Publication:
    """One publish_run call: the repository, what the branch holds, and the run's artifacts."""

    api: HfApi
    run_dir: Path
    repo_id: str
    branch: str
    training_state: str
    retries: int
    backoff_s: float
    live: bool
    tokenizer: str | None
    log: Callable[[str], None]
    lines: list[str] = field(default_factory=list)
    titles: set[str] = field(default_factory=set)
    head: str | None = None
    remote_files: set[str] | None = None
    verdicts: dict[int, str | None] = field(default_factory=dict)  # step -> None (verified) or the problem

    def say(self, line: str) -> None:
        self.lines.append(line)
        self.log(line)

    def retry(self, what: str, call: Callable, before_retry: Callable[[], bool] | None = None):  # noqa: ANN202
        """call() with up to `retries` attempts; before_retry() -> True means the work turned out to be done."""
        for attempt in range(1, self.retries + 1):
            try:
                if attempt > 1 and before_retry is not None and before_retry():
                    return None
                return call()
            except PublishError:
                raise
            except Exception as err:  # classified: transient ones are retried, the others end it
                if not _transient(err) or attempt == self.retries:
                    raise PublishError(f"{what}: {_one_line(err)} (attempt {attempt} of {self.retries}); nothing "
                                       f"is lost, rerun to send what is left") from err
                wait = min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
                self.say(f"{what}: {_one_line(err)}; attempt {attempt} of {self.retries}, retrying in {wait:g} s")
                time.sleep(wait)
        raise AssertionError("unreachable")

    # the branch
    def prepare_repository(self, collection_slug: str) -> None:
        url = self.retry(f"create {self.repo_id}", lambda: self.api.create_repo(self.repo_id, exist_ok=True))
        self.repo_id = url.repo_id
        if collection_slug:
            self.retry(f"add {self.repo_id} to collection {collection_slug}", lambda: self.api.add_collection_item(
                collection_slug, self.repo_id, "model", exists_ok=True))
        self.retry(f"create branch {self.branch}", lambda: self.api.create_branch(self.repo_id, branch=self.branch,
                                                                                  exist_ok=True))
        self.read_branch()

    def read_branch(self, revision: str | None = None) -> None:
        commits = self.retry(f"list the commits of {self.repo_id}@{revision or self.branch}",
                             lambda: self.api.list_repo_commits(self.repo_id, revision=revision or self.branch))
        self.titles = {commit.title for commit in commits}
        self.head = commits[0].commit_id if commits else None
        self.remote_files = None

    def files_on_branch(self, revision: str) -> set[str]:
        if self.remote_files is None:
            self.remote_files = set(self.retry(f"list the files of {self.repo_id}@{revision}",
                                               lambda: self.api.list_repo_files(self.repo_id, revision=revision)))
        return self.remote_files

    def commit(self, artifact: Artifact, files: Files, revision: str) -> None:
        """One commit titled artifact.title on `revision`, unless a retry finds it already there."""

        def operations() -> list:
            stale = sorted(path for path in self.files_on_branch(revision) if path.startswith(artifact.replaces)
                           and path not in files) if artifact.replaces else []
            return ([CommitOperationAdd(path, source) for path, source in files.items()]
                    + [CommitOperationDelete(path) for path in stale])

        def send():  # noqa: ANN202
            ops = operations()
            with warnings.catch_warnings():  # train_data/ is an HF dataset (.arrow): pico-train sends it too
                warnings.filterwarnings("ignore", message="It seems that you are about to commit a data file")
                info = self.api.create_commit(self.repo_id, ops, commit_message=artifact.title, revision=revision,
                                              parent_commit=self.head)
            return info, ops

        def landed() -> bool:  # a lost reply, or another publisher: re-read the branch
            self.read_branch(revision)
            return artifact.title in self.titles

        result = self.retry(f"commit '{artifact.title}'", send, landed)
        if result is None:
            self.say(f"already there: {artifact.title}")
            return
        info, ops = result
        if info.oid == self.head:
            self.say(f"unchanged: {artifact.title} (the branch already holds these files; nothing sent)")
            return
        self.head = info.oid
        self.titles.add(artifact.title)
        if self.remote_files is not None:
            self.remote_files |= set(files)
            self.remote_files -= {op.path_in_repo for op in ops if isinstance(op, CommitOperationDelete)}
        size = sum(len(source) if isinstance(source, bytes) else source.stat().st_size for source in files.values())
        deleted = sum(isinstance(op, CommitOperationDelete) for op in ops)
        self.say(f"sent: {artifact.title} ({len(files)} file{'s' * (len(files) != 1)}, {size / 2**20:,.1f} MiB"
                 f"{f', {deleted} stale deleted' if deleted else ''})")

    # the run
    def verified(self, checkpoint: Checkpoint) -> None:
        """Raise CheckpointError unless the checkpoint's files match its manifest (sha256), checked once per call."""
        if checkpoint.step not in self.verdicts:
            state = json.loads((checkpoint.directory / STATE_FILE).read_text())
            self.verdicts[checkpoint.step] = verify_checkpoint(checkpoint.directory, state["tensor_parallel_size"])
        if self.verdicts[checkpoint.step] is not None:
            raise CheckpointError(f"{checkpoint.directory} fails verification: {self.verdicts[checkpoint.step]}")

    def hf_export(self, checkpoint: Checkpoint) -> Path:
        """The verified pico HF directory of a checkpoint: the one a pruned checkpoint kept, else an export into the
        cache (keyed by the manifest, so a checkpoint saved again is exported again)."""
        self.verified(checkpoint)
        if not checkpoint.full:
            return checkpoint.directory / PRUNED_EXPORT
        cache = self.run_dir / CACHE_DIR
        key = hashlib.sha256((checkpoint.directory / MANIFEST).read_bytes()).hexdigest()[:12]
        target = cache / f"{checkpoint.directory.name}-{key}"
        if not target.is_dir():
            cache.mkdir(exist_ok=True)
            loaded = load_checkpoint(checkpoint.directory, verify_hash=False)  # hashed just above
            export_checkpoint(loaded, target, "pico", self.tokenizer)
        return target

    def model_files(self, checkpoint: Checkpoint) -> Files:
        export = self.hf_export(checkpoint)
        return {**{name: export / name for name in MODEL_FILES}, "pico_decoder.py": MODELLING_FILE}

    def tokenizer_files(self, checkpoint: Checkpoint) -> Files:
        export = self.hf_export(checkpoint)
        return {name: export / name for name in TOKENIZER_FILES if (export / name).is_file()}

    def config_files(self, checkpoint: Checkpoint) -> Files:
        self.verified(checkpoint)
        config, global_batch = checkpoint_config(checkpoint.directory)
        text = yaml.safe_dump(pico_training_config(config, global_batch), sort_keys=False)
        return {"training_config.yaml": text.encode()}

    def state_files(self, checkpoint: Checkpoint) -> Files:
        self.verified(checkpoint)
        names = [*checkpoint.manifest["files"], MANIFEST]
        return {f"{STATE_DIR}/{name}": checkpoint.directory / name for name in names}

    def eval_files(self, checkpoint: Checkpoint) -> Files:
        results = self.run_dir / "eval_results"
        return {f"eval_results/{path.name}": path for path in sorted(results.glob("step_*.json"))
                if 0 <= step_of(path.stem) <= checkpoint.step}

    def dynamics_files(self, checkpoint: Checkpoint, split: str) -> Files:
        """learning_dynamics/{split}_*.pt and {split}_data/ as the checkpoint's verified manifest lists them."""
        self.verified(checkpoint)
        names = sorted(name for name in checkpoint.manifest["files"] if name.startswith(f"learning_dynamics/{split}_"))
        return {name: checkpoint.directory / name for name in names}

    def with_state(self, checkpoints: list[Checkpoint]) -> set[int]:
        """Steps whose training state is published: every full checkpoint, the newest only (during training, only
        once it is the run's last step), or none."""
        full = [c for c in checkpoints if c.full]
        if self.training_state == "never" or not full:
            return set()
        if self.training_state == "every":
            return {c.step for c in full}
        newest = checkpoints[-1]
        if not newest.full or (self.live and newest.step < checkpoint_config(newest.directory)[0].training.max_steps):
            return set()
        return {newest.step}

    def artifacts(self, checkpoints: list[Checkpoint]) -> list[Artifact]:
        """Everything the run directory has to publish, in pico-train's order."""
        state_steps = self.with_state(checkpoints)
        out = []
        for index, checkpoint in enumerate(checkpoints):
            step, dynamics = checkpoint.step, checkpoint.directory / "learning_dynamics"
            out.append(Artifact(model_title(step), step, lambda c=checkpoint: self.model_files(c)))
            if index == 0:
                out.append(Artifact(tokenizer_title(step), step, lambda c=checkpoint: self.tokenizer_files(c)))
                out.append(Artifact(config_title(step), step, lambda c=checkpoint: self.config_files(c)))
            if step in state_steps:
                out.append(Artifact(state_title(step), step, lambda c=checkpoint: self.state_files(c),
                                    (f"{STATE_DIR}/",)))
            if (self.run_dir / "eval_results" / f"step_{step}.json").is_file():
                out.append(Artifact(eval_title(step), step, lambda c=checkpoint: self.eval_files(c)))
            for split in ("train", "val"):
                if (dynamics / f"{split}_activations.pt").is_file():
                    out.append(Artifact(dynamics_title(split, step), step,
                                        lambda c=checkpoint, s=split: self.dynamics_files(c, s),
                                        (f"learning_dynamics/{split}_data/",) if split == "train" else ()))
        return out


def publish_run(run_dir: Path, repo_id: str, branch: str | None = None, update_main: bool = False,
                training_state: str = "last", collection_slug: str = "", retries: int = 5, *, live: bool = False,
                tokenizer: str | None = None, backoff_s: float = 2.0, timeout_s: float = 300.0,
                endpoint: str | None = None, token: str | None = None,
                log: Callable[[str], None] = lambda line: None) -> list[str]:
    """Publish (or complete the publication of) runs/RUN to `repo_id` on `branch` (default: the run's
    checkpointing.run_name); returns lines saying what was sent and what was already there.

    training_state: every | last (the newest checkpoint's; with live=True, set while the run is still training, only
    once that is the run's final step) | never. update_main: also put the newest checkpoint's files on `main`.
    Token from `token`, HF_TOKEN or the cached login; endpoint from `endpoint` or HF_ENDPOINT. Raises PublishError
    (the Hub failed after `retries` attempts, or a checkpoint failed verification: the rest is still published) or
    CheckpointError (the run directory cannot be published)."""
    if training_state not in TRAINING_STATES:
        raise CheckpointError(f"training_state='{training_state}': use one of {', '.join(TRAINING_STATES)}")
    if retries < 1:
        raise CheckpointError(f"retries={retries}: at least one attempt is needed")
    run_dir = Path(run_dir)
    refuse_links(run_dir)  # a received run: nothing in it may point elsewhere, nor be uploaded from there
    checkpoints = run_checkpoints(run_dir)
    complete = [c for c in checkpoints if c.manifest is not None]
    if branch is None and complete:
        branch = checkpoint_config(complete[0].directory)[0].checkpointing.run_name
    publication = Publication(HfApi(endpoint=endpoint, token=token), run_dir, repo_id, branch, training_state,
                              retries, backoff_s, live, tokenizer, log)
    for checkpoint in checkpoints:
        if checkpoint.manifest is None:
            publication.say(f"{checkpoint.directory.name}: no manifest yet (a save in progress, or one that never "
                            f"finished); not published")
    if not complete:
        return publication.lines
    with request_timeout(timeout_s):
        publication.prepare_repository(collection_slug)
        artifacts = publication.artifacts(complete)
        missing = [artifact for artifact in artifacts if artifact.title not in publication.titles]
        publication.say(f"{publication.repo_id}@{branch}: {len(artifacts) - len(missing)} of {len(artifacts)} "
                        f"commits already there, {len(missing)} to send")
        failed: dict[int, str] = {}
        for artifact in missing:
            if artifact.step in failed:
                continue
            try:
                files = artifact.files()
            except CheckpointError as err:
                failed[artifact.step] = str(err)
                publication.say(f"step {artifact.step}: {err}; its remaining commits are not sent")
                continue
            publication.commit(artifact, files, branch)
        if update_main:
            _update_main(publication, [c for c in complete if c.step not in failed],
                         [artifact for artifact in artifacts if artifact.step not in failed])
    if failed:
        first = min(failed)
        raise PublishError(f"{len(failed)} checkpoint(s) not published (step {first}: {failed[first]}); everything "
                           f"else is on {publication.repo_id}@{branch}")
    shutil.rmtree(run_dir / CACHE_DIR, ignore_errors=True)  # everything is sent: the exports are not needed
    return publication.lines


def _update_main(publication: Publication, checkpoints: list[Checkpoint], artifacts: list[Artifact]) -> None:
    """Put the newest checkpoint's files on `main` (as pico's published repositories have it), in one commit:
    the HF model and tokenizer, training_config.yaml, eval_results/, its learning dynamics and training state."""
    if not checkpoints:
        return
    newest = checkpoints[-1]
    title = main_title(publication.branch, newest.step)
    publication.read_branch("main")
    if title in publication.titles:
        publication.say(f"already there: {title} (main)")
        return
    files: Files = {}
    for artifact in artifacts:
        if artifact.step == newest.step or artifact.title.startswith(("Saving Tokenizer", "Saving Training Config")):
            files.update(artifact.files())
    main = Artifact(title, newest.step, lambda: files, (f"{STATE_DIR}/", "learning_dynamics/"))
    publication.commit(main, files, "main")
