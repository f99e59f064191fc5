"""Publish a run to the Hugging Face Hub the way pico-train does, or complete an interrupted publication.

    python tools/publish_run.py runs/RUN --repo-id ORG/NAME
    python tools/publish_run.py runs/RUN --repo-id ORG/NAME --branch RUN --update-main --training-state every
    python tools/publish_run.py runs/pico/RUN --repo-id ORG/NAME     # a pico run directory (converted, or pico-train's)
One commit per artifact per checkpoint on the branch (default: the run's run_name), with pico-train's titles and
paths, so pico-analyze's remote mode (--repo_id ORG/NAME --branch RUN) reads it. Only what the branch lacks is sent
(its commit titles are compared with the run directory), so rerunning completes a publication. A repository created
here is private unless --public. Token: HF_TOKEN or `hf auth login` (never an argument); HF_ENDPOINT selects another
Hub. docs/publishing.md says what is sent.
"""

import argparse
import sys
from pathlib import Path

from megapico.checkpoint.paths import CheckpointError
from megapico.config import ConfigError
from megapico.publish.hub import TRAINING_STATES, PublishError
from megapico.publish.pico_run import publish_directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="the megapico run directory, runs/RUN (its checkpoints/ and eval_results/), "
                                        "or a pico run directory (tools/convert_to_hf.py --run-dir's, or pico-train's)")
    parser.add_argument("--repo-id", required=True, help="the Hub model repository, ORG/NAME (created if missing)")
    parser.add_argument("--branch", help="the branch to publish on (default: the run's checkpointing.run_name)")
    parser.add_argument("--update-main", action="store_true",
                        help="also put the newest checkpoint's files on main, as pico's published repositories have it")
    parser.add_argument("--training-state", choices=TRAINING_STATES, default="last",
                        help="which checkpoints also send their training state (megapico_state/, what resuming "
                             "needs; a pico-train run's fabric_state/; the optimizer state is large): every, last (the "
                             "newest; default) or never")
    parser.add_argument("--collection-slug", default="", help="a Hub collection to add the repository to")
    parser.add_argument("--public", action="store_true",
                        help="create the repository public (default: private; an existing one keeps its visibility)")
    parser.add_argument("--retries", type=int, default=5,
                        help="attempts per request before giving up, with exponential backoff (default 5)")
    parser.add_argument("--backoff-s", type=float, default=2.0,
                        help="the wait after the first failed attempt, doubled after each one (default 2)")
    parser.add_argument("--timeout-s", type=float, default=300.0,
                        help="the limit on each network operation (connect, read, write), seconds (default 300)")
    parser.add_argument("--tokenizer", help="tokenizer.json to ship (default: the run's data.tokenizer; a pico run "
                                            "directory's own, from its first checkpoint)")
    parser.add_argument("--live", action="store_true",
                        help="set by training's background publisher: the run is still training, so "
                             "--training-state last waits for the checkpoint at training.max_steps")
    args = parser.parse_args(argv)
    try:
        publish_directory(Path(args.run_dir), args.repo_id, args.branch, args.update_main, args.training_state,
                          args.collection_slug, args.retries, live=args.live, tokenizer=args.tokenizer,
                          private=not args.public, backoff_s=args.backoff_s, timeout_s=args.timeout_s,
                          log=lambda line: print(line, flush=True))
    except (PublishError, CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except ValueError as err:  # huggingface_hub's argument checks (a repo id it refuses)
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
