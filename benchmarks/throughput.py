"""fastvpd throughput benchmark: loaders, step ladders, end to end, hardware use, full-recipe projection.

    python benchmarks/throughput.py [--quick] [--sections loaders,steps,e2e] [--arch resnet50 --res 224
                                    --batch 256] [--profile] [--compile] [--experiments] [--out DIR]

Every speed-up is a ratio against a baseline measured in the same process on the same inputs:
- loaders (benchmarks/loaders.py): each loader row's two-view `moco_v2` samples/s against the torchvision
  backend, on the same images (a synthetic ImageNet-like set made and converted once, or the images
  already in --data-dir/src), same cores, same batch size;
- steps (moco_steps.py, distill_steps.py): a ladder from the reference MoCo formulation to the package's
  captured, compiled step, and the distillation step's, on device-resident inputs;
- e2e (e2e.py): `fastvpd.pretrain` over each loader row for a fixed number of steps.
--experiments adds the variants no GPU run has decided yet (benchmarks/experiments/).
A section (or a row) whose package, module or GPU is missing is skipped with the reason in the table.
Output (report.py): a terminal table, results.json, results.md and chart.png in the output folder.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `fastvpd` and `benchmarks` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.distill_steps import section_distill  # noqa: E402
from benchmarks.e2e import section_e2e  # noqa: E402
from benchmarks.harness import SECTIONS, Options, Skip, first_line, log  # noqa: E402
from benchmarks.hw import device_facts, device_slug  # noqa: E402
from benchmarks.ladder import RowHook  # noqa: E402
from benchmarks.loaders import all_rows, section_loaders  # noqa: E402
from benchmarks.moco_steps import section_steps  # noqa: E402
from benchmarks.projection import projection  # noqa: E402
from benchmarks.report import render_text, write_report  # noqa: E402
from fastvpd.config import ConfigError, UserError, main_guard  # noqa: E402

SIZES = ("res", "batch", "queue", "warmup", "repeats", "images", "loader_batches", "workers", "e2e_steps")


def _row_list(flag: str, text: str, e2e: bool) -> tuple[str, ...]:
    """A comma-separated list of loader rows ('' = the default rows); an unknown name is a ConfigError."""
    allowed = [r.name for r in all_rows() if r.e2e or not e2e]
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    if any(n not in allowed for n in names):
        raise ConfigError(f"{flag} {text!r}: choose from {','.join(allowed)}")
    return names


def parse_args(argv: Sequence[str] | None) -> tuple[Options, argparse.Namespace]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small sizes: under 2 minutes on a 2-core CPU")
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--arch", default="", help="backbone (default: resnet50 on GPU, resnet18 on CPU)")
    p.add_argument("--res", type=int, default=0, help="view resolution in px")
    p.add_argument("--batch", type=int, default=0, help="batch size for loaders, steps and e2e")
    p.add_argument("--queue", type=int, default=0, help="MoCo queue size")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps before each rung")
    p.add_argument("--repeats", type=int, default=0, help="timed steps per rung (median reported)")
    p.add_argument("--images", type=int, default=0, help="synthetic images for the loader/e2e sections")
    p.add_argument("--loader-batches", type=int, default=0, help="timed batches per loader row")
    p.add_argument("--workers", type=int, default=0, help="loader workers (default: all usable cores)")
    p.add_argument("--e2e-steps", type=int, default=0, help="pretraining steps per row in the e2e section")
    p.add_argument("--e2e-backends", default="", help="loader rows run end to end (default: the usual rows)")
    p.add_argument("--loader-backends", default="", help="loader rows timed (default: the usual rows)")
    p.add_argument("--amp", default="bf16", choices=("bf16", "none"), help="step autocast (GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: usable cores)")
    p.add_argument("--compile", action="store_true", help="add the torch.compile rungs")
    p.add_argument(
        "--experiments",
        action="store_true",
        help="also the variants no GPU run has decided yet (benchmarks/experiments/)",
    )
    p.add_argument(
        "--no-distill", action="store_true", help="skip the distillation step ladder (with --sections steps)"
    )
    p.add_argument(
        "--rungs", default="", help="regex: run only the ladder rungs it matches (and each ladder's baseline)"
    )
    p.add_argument("--profile", action="store_true", help="write a torch.profiler trace of a few steps")
    p.add_argument(
        "--data-dir",
        default="",
        help="holds src/ (the images: made synthetic when absent, used as they are otherwise) and converted/",
    )
    p.add_argument("--out", default="", help="output folder (default benchmarks/results/<device>-<date>/)")
    a = p.parse_args(argv)
    sections = tuple(s.strip() for s in a.sections.split(",") if s.strip())
    if not sections or any(s not in SECTIONS for s in sections):
        raise ConfigError(f"--sections {a.sections!r}: choose from {','.join(SECTIONS)}")
    try:
        re.compile(a.rungs)
    except re.error as e:
        raise ConfigError(f"--rungs {a.rungs!r} is not a regular expression ({e})") from None
    for name in SIZES:
        if getattr(a, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")
    opts = Options(
        quick=a.quick,
        sections=sections,
        device=a.device,
        arch=a.arch,
        **{k: getattr(a, k) for k in SIZES if k != "workers"},
        loader_workers=a.workers,
        e2e_backends=_row_list("--e2e-backends", a.e2e_backends, e2e=True),
        loader_backends=_row_list("--loader-backends", a.loader_backends, e2e=False),
        amp=a.amp,
        threads=a.threads,
        compile=a.compile,
        experiments=a.experiments,
        distill=not a.no_distill,
        rungs=a.rungs,
        profile=a.profile,
        data_dir=a.data_dir,
        out=a.out,
    )
    return opts, a


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def run(opts: Options) -> dict[str, Any]:
    """Run the selected sections and return the results dict (also written to opts.out)."""
    from fastvpd.models import ARCHS

    device = pick_device(opts.device)
    opts.resolve(device)
    if opts.arch not in ARCHS:
        raise ConfigError(f"--arch {opts.arch!r} is not one of {', '.join(ARCHS)}")
    facts = device_facts(device)
    if not opts.out:
        opts.out = str(ROOT / "benchmarks" / "results" / f"{device_slug(facts)}-{facts['date'][:10]}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.set_num_threads(opts.threads)
    log(
        f"device {facts['device_name']}, {facts['cpu_cores']} cores; sections {','.join(opts.sections)}; "
        f"{opts.arch} {opts.res}px batch {opts.batch}; out {opts.out}"
    )
    results: dict[str, Any] = {"meta": facts, "options": asdict(opts)}
    t_all = time.perf_counter()
    data_root: Path | None = None

    def guarded(key: str, fn: Callable[[], dict[str, Any]]) -> None:
        t = time.perf_counter()
        try:
            results[key] = fn()
        except Skip as e:
            results[key] = {"status": "skipped", "reason": str(e), "rows": []}
        except (UserError, ConfigError) as e:
            results[key] = {"status": "skipped", "reason": str(e).splitlines()[0][:200], "rows": []}
        except Exception as e:
            traceback.print_exc()
            results[key] = {"status": "failed", "reason": first_line(e), "rows": []}
        results[key]["seconds"] = round(time.perf_counter() - t, 1)
        if results[key].get("status", "ok") != "ok":
            log(f"{key}: {results[key]['status']} ({results[key]['reason']})")
        # A partial report after every section: a run killed by a time limit still leaves its figures.
        write_report({**results, "projection": projection(results)}, opts.out)

    def partial(key: str) -> RowHook:
        def write(rows: list[dict[str, Any]]) -> None:
            part = {"rows": rows, "notes": [f"cut short: the report as of rung {len(rows)}"]}
            write_report({**results, key: part, "projection": projection(results)}, opts.out)

        return write

    # The step ladders first: they hold the headline figures, and a run cut short by a time limit (the
    # GPU suite's) should lose loader or end-to-end rows rather than them.
    if "steps" in opts.sections:
        guarded("steps", lambda: section_steps(opts, device, partial("steps")))
        if opts.distill:
            guarded("distill", lambda: section_distill(opts, device, partial("distill")))
    if "loaders" in opts.sections:
        guarded("loaders", lambda: section_loaders(opts, device))
        if results["loaders"].get("data_root"):
            data_root = Path(results["loaders"]["data_root"])
    if "e2e" in opts.sections:
        guarded("e2e", lambda: section_e2e(opts, device, data_root, results.get("loaders")))
    results["projection"] = projection(results)
    results["seconds"] = round(time.perf_counter() - t_all, 1)
    return results


@main_guard
def main(argv: Sequence[str] | None = None) -> int:
    opts, _ = parse_args(argv)
    results = run(opts)
    print()
    print(render_text(results))
    paths = write_report(results, opts.out)
    print(f"\nwrote {', '.join(str(p) for p in paths.values())} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
