"""`capfilt bootstrap` (rounds of fine-tune, CapFilt, re-pretrain) and `capfilt demo` (all of it
on the bundled demo world, in a few minutes on a laptop CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from capfilt.commands._shared import (CaptionerOption, ConfigOption, ScorerOption, SetOption, VerboseOption,
                                      config_from, console)

# The demo's budget: a small MED and a few epochs, so the whole loop runs in minutes on 2 cores.
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def bootstrap_config(path: Optional[Path], overrides: Optional[list[str]], flags: dict | None = None,
                     scorers: Optional[list[str]] = None):
    """`config_from` with the bootstrap's default `run.filter.keep=auto` (each round's audit decides
    whether the synthetic captions go in) where the YAML file does not set the key; a --set still wins."""
    import yaml

    tree = yaml.safe_load(path.read_text()) if path is not None else None
    run = tree.get("run") if isinstance(tree, dict) else None
    filt = run.get("filter") if isinstance(run, dict) else None
    named = isinstance(filt, dict) and "keep" in filt
    return config_from(path, ([] if named else ["run.filter.keep=auto"]) + list(overrides or []), flags, scorers)


def _run_bootstrap(workdir: Path, human: str | Path, web: str | Path, test: Optional[str | Path], truth: Optional[Path],
                   init: Optional[Path], new_round: bool, cfg) -> list[dict]:
    from capfilt import preflight
    from capfilt.pipelines.bootstrap import Bootstrap, BootstrapInputs, headline

    preflight.check(inputs={"--human": str(human), "--web": str(web), "--test": str(test or "")})
    inputs = BootstrapInputs(human=str(human), web=str(web), test=str(test) if test else None,
                             truth=str(truth) if truth else None, init=str(init) if init else None)
    results = Bootstrap(workdir, inputs, cfg, log=typer.echo).run(cfg.bootstrap.rounds, new_round)
    typer.echo(headline(results))
    from capfilt.pipelines.ray_env import ray_logs

    if ray_logs():  # one session folder per Ray the rounds started, side by side
        typer.echo(f"Ray's full logs in the session folders under {Path(ray_logs()).parent.parent}")
    return results


def bootstrap(
    workdir: Annotated[Path, typer.Option("--workdir", help="Folder for every round's models, "
                                          "CapFilt output and evaluation; re-run to resume.")],
    human: Annotated[str, typer.Option("--human", help="Human-annotated input shards: a folder or URI "
                                       "(s3://, gs://, ...).")],
    web: Annotated[str, typer.Option("--web", help="Web input shards to clean: a folder, glob or URI.")],
    rounds: Annotated[Optional[int], typer.Option(
        "--rounds", min=0, help="CapFilt rounds after round 0 (bootstrap.rounds).")] = None,
    test: Annotated[Optional[str], typer.Option(
        "--test", help="Held-out shards evaluated after every pre-training: a folder or URI.")] = None,
    truth: Annotated[Optional[Path], typer.Option(
        "--truth", exists=True, dir_okay=False,
        help="Demo-world truth file: filter precision/recall per round.")] = None,
    init: Annotated[Optional[Path], typer.Option(
        "--init", exists=True, file_okay=False, help="A saved MED used as round 0 (skips its pre-training).")] = None,
    new_round: Annotated[bool, typer.Option(
        "--new-round", help="The config changed: keep finished rounds, restart the first unfinished one.")] = False,
    scorers: ScorerOption = None,
    captioner: CaptionerOption = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Round 0 pre-trains MED on human + raw web; each round then fine-tunes a captioner and a
    filter on the human pairs, audits them on held-out human pairs (which decides, with the default
    run.filter.keep=auto, whether synthetic captions are kept), runs CapFilt on the web shards and
    pre-trains a new MED on human + kept pairs, evaluating every MED. With --captioner (or
    run.caption.model) the rounds use that captioner as it is and fine-tune only the filter."""
    cfg = bootstrap_config(config, overrides, {"bootstrap.rounds": rounds, "run.caption.model": captioner},
                           scorers)
    with console(verbose):
        _run_bootstrap(workdir, human, web, test, truth, init, new_round, cfg)

def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the world, rounds and report go.")]
    = Path("demo-out"),
    config: ConfigOption = None,
    overrides: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """The whole loop on the bundled demo world, locally: generate the world, pre-train a small
    MED, run one bootstrap round (fine-tune, CapFilt on Ray, re-pretrain), evaluate, report.
    Without --config, the bundled capfilt/configs/demo.yaml."""
    from capfilt.demo_world import write_world
    from capfilt.report import write_report

    cfg = bootstrap_config(config or DEMO_CONFIG, overrides)
    world = workdir / "world"
    if not (world / "truth.parquet").is_file():
        typer.echo(f"[run ] demo world -> {world}")
        write_world(cfg.demo, world)
    else:
        typer.echo(f"[skip] demo world: exists ({world})")
    with console(verbose):
        _run_bootstrap(workdir / "bootstrap", world / "human", world / "web", world / "test",
                       world / "truth.parquet", None, False, cfg)
    report = write_report(workdir / "bootstrap", workdir / "report.html")
    typer.echo(f"report: {report}")


COMMANDS = {"bootstrap": bootstrap, "demo": demo}
