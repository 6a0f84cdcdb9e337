#!/usr/bin/env bash
# The checks that need a GPU, in one call of at most 8 minutes, ending with one summary.
#
#   bash benchmarks/gpu_check.sh                        # on a machine with a CUDA device
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh   # rehearsal: the same steps, tiny, on the CPU
#   bash benchmarks/gpu_check.sh --list                 # print each step's command, run nothing
#
# Steps, each with its own time limit inside the total budget:
#   cuda_tests     pytest -m cuda: CUDA against the CPU (tests/test_cuda.py) and the test that the
#                  perturbation never synchronises host and device (tests/test_ddfp.py)
#   perturbation   benchmarks/perturbation.py at 4 x 129 x 129 against the reference design
#   train_step     benchmarks/train_step.py (ResNet-101, crop 321, 4+4): the overhead of DDFP
#   shapes_data    examples/make_shapes_dataset.py: a generated VOC-layout folder of 3 classes
#   loop_bf16      50 iterations of examples/voc_unimatch_plus_ddfp.py on it with --amp bf16
#   loop_torchrun  the same run through torchrun --nproc_per_node=1
# The loop runs use --threshold 0 so that every pixel is confident and every stream does work.
#
# Environment:
#   GPU_CHECK_DEVICE    cuda (default) or cpu
#   GPU_CHECK_RESULTS   where the JSON files go; default benchmarks/results on cuda, a temporary
#                       folder on cpu (a rehearsal never replaces measured results)
#   GPU_CHECK_BUDGET_S  seconds for all steps together (default 420 on cuda, 150 on cpu); the
#                       check for CUDA, the step checks and the summary take well under a minute
#   PYTHON              the interpreter (default python)
#
# Writes <results>/gpu_check.json (gpu_check_cpu.json for the rehearsal): per step its command,
# status (pass, fail, timeout or not_run), seconds, what was checked and the tail of its log. The
# benchmarks write perturbation_cuda.json and train_step_cuda.json beside it. Exit status: 0 when
# every step passed, 1 when one did not, 2 for bad usage or a missing CUDA device.
set -uo pipefail

usage() { sed -n '2,30p' "$0" | sed -e 's/^# \{0,1\}//'; }

LIST=0
for arg in "$@"; do
    case "$arg" in
        -h | --help) usage; exit 0 ;;
        --list) LIST=1 ;;
        *) echo "gpu_check: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
PY=${PYTHON:-python}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

case "$DEVICE" in
    cuda)
        RESULTS=${GPU_CHECK_RESULTS:-$REPO/benchmarks/results}
        BUDGET=${GPU_CHECK_BUDGET_S:-420}
        NAME=gpu_check
        LIMITS=(45 160 100 20 50 45)
        PERTURBATION_ARGS=(--device cuda --sizes 129 --sections shapes --repeats 5)
        TRAIN_STEP_ARGS=(--device cuda)
        SHAPES_ARGS=(--images 80 --val 16 --size 288 352)
        # 64 training images, 16 labelled, 48 unlabelled: 12 iterations of 4+4 per epoch.
        LOOP_ARGS=(--num-labeled 16 --batch-size 4 --epochs 5 --iters-per-epoch 10
            --eval-every 5 --workers 4 --device cuda)
        ITERATIONS=50
        ;;
    cpu)
        RESULTS=${GPU_CHECK_RESULTS:-$WORK/results}
        BUDGET=${GPU_CHECK_BUDGET_S:-150}
        NAME=gpu_check_cpu
        LIMITS=(30 60 40 15 30 30)
        PERTURBATION_ARGS=(--device cpu --quick --sections shapes)
        TRAIN_STEP_ARGS=(--device cpu --quick --fp none ddfp)
        SHAPES_ARGS=(--images 12 --val 4 --size 40 48)
        LOOP_ARGS=(--num-labeled 4 --batch-size 2 --epochs 1 --iters-per-epoch 2 --workers 0
            --device cpu --backbone mobilenet_v2 --crop-size 32)
        ITERATIONS=2
        ;;
    *)
        echo "gpu_check: GPU_CHECK_DEVICE must be cuda or cpu, got '$DEVICE'" >&2
        exit 2
        ;;
esac
SHAPES="$WORK/shapes"
LOOP=(examples/voc_unimatch_plus_ddfp.py --dataset custom --data-root "$SHAPES"
    --class-names "$SHAPES/classes.txt" --val-list "$SHAPES/val.txt" --amp bf16
    --threshold 0.0 --log-every 1 --no-progress "${LOOP_ARGS[@]}")

# Checks one finished step and appends its record to $WORK/steps.jsonl; "summary" writes the JSON.
python_helper() {
    "$PY" - "$@" <<'PY'
import csv
import json
import math
import sys
from pathlib import Path

work = Path(sys.argv[2])
records = work / "steps.jsonl"


def finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_tests(device, log):
    summary = next((line for line in reversed(log) if " in " in line and "=" not in line), "")
    summary = summary or (log[-1] if log else "")
    if device == "cuda" and ("skipped" in summary or "passed" not in summary):
        return False, f"every CUDA test must run and pass: {summary}"
    return "failed" not in summary and "error" not in summary, summary


def check_perturbation(device, results, quick):
    path = results / ("perturbation_quick.json" if quick else f"perturbation_{device}.json")
    shapes = json.loads(path.read_text())["results"]["shapes"]
    notes, ok = [], bool(shapes)
    for shape in shapes:
        for design in ("ddfp_lib", "ddfp_lib_dense", "ddfp_lib_chunked"):
            result = shape["designs"][design]
            cosine = result.get("cosine_vs_reference", {}).get("overall", float("nan"))
            ok &= result.get("status") == "ok" and cosine > 0.999
            notes.append(
                f"{shape['batch']}x{shape['size']}x{shape['size']} d={shape['density']} {design}: "
                f"{result.get('speedup_vs_reference', float('nan')):.2f}x faster, "
                f"{result.get('memory_ratio_vs_reference', float('nan')):.2f}x less memory, "
                f"cosine {cosine:.6f}"
            )
    return ok, "; ".join(notes)


def check_train_step(device, results, quick):
    path = results / f"train_step_{device}{'_quick' if quick else ''}.json"
    found = json.loads(path.read_text())["results"]
    clock = next(iter(found["setup"]["clocks"]))
    overhead = {**found["overhead"][clock], **found["overhead"]["profile"]}
    steps = {fp: entry[clock]["step"]["median"] for fp, entry in found["configs"].items()}
    ok = bool(overhead) and all(finite(v) for v in [*overhead.values(), *steps.values()])
    shown = ", ".join(f"{fp} {1e3 * s:.1f} ms" for fp, s in steps.items())
    ratios = ", ".join(f"{k} {100 * v:+.1f} %" for k, v in overhead.items())
    return ok, f"{found['setup']['backbone']} crop {found['setup']['crop_size']}: {shown}; {ratios}"


def check_shapes(shapes):
    names = (shapes / "classes.txt").read_text().split()
    images = len(list((shapes / "JPEGImages").glob("*.jpg")))
    return len(names) == 3 and images > 0, f"{images} images, classes {names}"


def check_loop(out, iterations):
    summary = json.loads((out / "summary.json").read_text())
    args = json.loads((out / "args.json").read_text())
    with open(out / "log.csv") as file:
        rows = list(csv.DictReader(file))
    losses = [float(v) for row in rows for k, v in row.items() if k.startswith("loss") and v]
    per_class = summary["final_iou_per_class"]
    ok = (
        summary["iterations"] == iterations
        and not summary["stopped_early"]
        and finite(summary["best_miou"])
        and len(per_class) == 3
        and args["amp"] == "bf16"
        and len(rows) == iterations
        and all(math.isfinite(v) for v in losses)
    )
    return ok, (
        f"{summary['iterations']} iterations on {args['device']}, amp {args['amp']}, "
        f"{len(losses)} finite losses logged, best mIoU {100 * summary['best_miou']:.2f} %, "
        f"{summary['seconds']:.0f} s"
    )


def verify(step, rc, seconds, limit, command, device, results, iterations):
    log_path = work / f"{step}.log"
    log = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    quick = device == "cpu"
    if rc == 124 or rc == 137:
        status, ok, detail = "timeout", False, f"stopped after its limit of {limit} s"
    else:
        try:
            if step == "cuda_tests":
                ok, detail = check_tests(device, log)
            elif step == "perturbation":
                ok, detail = check_perturbation(device, results, quick)
            elif step == "train_step":
                ok, detail = check_train_step(device, results, quick)
            elif step == "shapes_data":
                ok, detail = check_shapes(work / "shapes")
            else:
                ok, detail = check_loop(work / step, iterations)
        except (OSError, KeyError, ValueError, TypeError) as error:
            ok, detail = False, f"no result to check: {type(error).__name__}: {error}"
        ok = ok and rc == 0
        status = "pass" if ok else "fail"
        if rc != 0:
            detail = f"exit status {rc}; {detail}"
    record = {
        "step": step,
        "status": status,
        "seconds": seconds,
        "limit_s": limit,
        "command": command,
        "checked": detail,
        "log_tail": log[-25:],
    }
    with open(records, "a") as file:
        file.write(json.dumps(record) + "\n")
    print(f"[gpu_check] {status.upper():7s} {step} ({seconds} s): {detail}", flush=True)


def summary(name, device, results, budget, total):
    sys.path.insert(0, str(Path.cwd()))
    from benchmarks.common import write_results

    steps = [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []
    passed = sum(step["status"] == "pass" for step in steps)
    payload = {
        "device": device,
        "budget_s": budget,
        "total_s": total,
        "passed": passed,
        "steps": steps,
    }
    prefix = "GPU_CHECK_DEVICE=cpu " if device == "cpu" else ""
    path = write_results(
        name, payload, results, device=device, argv=[f"{prefix}bash", "benchmarks/gpu_check.sh"]
    )
    print(f"\n[gpu_check] summary on {device}: {passed} of {len(steps)} steps passed in {total} s")
    for step in steps:
        print(f"  {step['status']:7s} {step['step']:14s} {step['seconds']:>4} s  {step['checked']}")
    print(f"[gpu_check] wrote {path}")
    return 0 if steps and passed == len(steps) else 1


if sys.argv[1] == "verify":
    step, rc, seconds, limit, command, device, results, iterations = sys.argv[3:11]
    verify(step, int(rc), int(seconds), int(limit), command, device, Path(results), int(iterations))
else:
    name, device, results, budget, total = sys.argv[3:8]
    sys.exit(summary(name, device, Path(results), int(budget), int(total)))
PY
}

START=$SECONDS

# run_step NAME LIMIT COMMAND...: run with a time limit cut to the budget left, then check it.
run_step() {
    local step=$1 limit=$2
    shift 2
    local shown
    shown=$(printf '%q ' "$@")
    if [ "$LIST" = 1 ]; then
        printf '%-14s %4s s  %s\n' "$step" "$limit" "$shown"
        return
    fi
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 10 ]; then
        printf '{"step": "%s", "status": "not_run", "seconds": 0, "limit_s": 0, "command": "", "checked": "the budget of %s s was spent", "log_tail": []}\n' \
            "$step" "$BUDGET" >>"$WORK/steps.jsonl"
        echo "[gpu_check] NOT_RUN $step: the budget of $BUDGET s was spent"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "[gpu_check] $step (limit $limit s): $shown"
    local began=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$WORK/$step.log" 2>&1
    local rc=$?
    python_helper verify "$WORK" "$step" "$rc" "$((SECONDS - began))" "$limit" "$shown" \
        "$DEVICE" "$RESULTS" "$ITERATIONS"
}

if [ "$LIST" = 1 ]; then
    echo "# $DEVICE, budget $BUDGET s, results in $RESULTS"
else
    if [ "$DEVICE" = cuda ] &&
        ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: no CUDA device here; GPU_CHECK_DEVICE=cpu rehearses the steps on the CPU" >&2
        exit 2
    fi
    mkdir -p "$RESULTS"
    echo "[gpu_check] $DEVICE, budget $BUDGET s, results in $RESULTS"
fi

run_step cuda_tests "${LIMITS[0]}" "$PY" -m pytest -q -p no:cacheprovider -m cuda \
    tests/test_cuda.py tests/test_ddfp.py
run_step perturbation "${LIMITS[1]}" "$PY" -m benchmarks.perturbation "${PERTURBATION_ARGS[@]}" \
    --results-dir "$RESULTS"
run_step train_step "${LIMITS[2]}" "$PY" -m benchmarks.train_step "${TRAIN_STEP_ARGS[@]}" \
    --results-dir "$RESULTS"
run_step shapes_data "${LIMITS[3]}" "$PY" examples/make_shapes_dataset.py "$SHAPES" \
    --num-classes 3 "${SHAPES_ARGS[@]}"
run_step loop_bf16 "${LIMITS[4]}" "$PY" "${LOOP[@]}" --out "$WORK/loop_bf16"
run_step loop_torchrun "${LIMITS[5]}" "$PY" -m torch.distributed.run --standalone \
    --nproc_per_node=1 "${LOOP[@]}" --out "$WORK/loop_torchrun"

[ "$LIST" = 1 ] && exit 0
python_helper summary "$WORK" "$NAME" "$DEVICE" "$RESULTS" "$BUDGET" "$((SECONDS - START))"
