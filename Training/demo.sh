#!/usr/bin/env bash
# The main job on the embedded default: synthetic phantoms into a case store, checked, one
# annotator's partial correction ingested, a U-Net trained on it (CPU: minutes), the test cases
# segmented with the bundle and evaluated (per-organ table and pictures).   usage: bash Training/demo.sh [VENV] [OUT]
# The training is supervised: within the 10-minute budget on 2 CPU cores a two-network method gets
# a third of the steps (Testing/BENCHMARKS.md); DEMO_METHOD=guidednet trains GuidedNet instead.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
out="${2:-demo}"
guidedseg="$venv/bin/guidedseg"
store="$out/store"

echo "== 1. synthetic abdominal CT phantoms -> case store $store"
if [ -f "$store/dataset.json" ]; then
  echo "(reusing the store written by an earlier run; delete $store to start over)"
else
  # Coarse voxels (8 x 8 x 10 mm) keep training to minutes on a laptop CPU.
  "$guidedseg" phantoms "$store" --cases 20 --labeled 8 --test 4 --seed 0 --size 48 48 32 --spacing 8 8 10
fi

echo
echo "== 2. what the store holds (and a check that every file is there and lines up)"
"$guidedseg" store info "$store" --check

echo
echo "== 3. an annotator corrects only the liver and the spleen of an unlabeled case"
truth="$(ls "$store"/phantomTruth/*.nii.gz | sort | head -n 1)"
case_id="$(basename "$truth" .nii.gz)"
if [ "$("$venv/bin/python" -c "import sys; from GuidedSegLib.store import CaseStore; print(CaseStore(sys.argv[1]).case(sys.argv[2]).kind)" "$store" "$case_id")" = unlabeled ]; then
  "$guidedseg" store ingest "$store" --case "$case_id" --label "$truth" \
      --annotated liver,spleen --source demo-annotator
fi
"$guidedseg" store history "$store" "$case_id"

echo
echo "== 4. the store now: the new case counts for the liver and the spleen only"
"$guidedseg" store info "$store"

echo
method="${DEMO_METHOD:-supervised}"
echo "== 5. train a small U-Net ($method) on the labeled cases and the partial correction"
run="$out/run-$method"
if [ -f "$run/bundle/model.json" ]; then
  echo "(reusing $run/bundle; delete $run to train again)"
else
  resume=""
  [ -f "$run/checkpoint.pt" ] && resume="--resume"
  # Phantoms vary shape, position, intensity and noise already: at this budget the crop
  # augmentation slowed learning, so the demo trains without it. 1500 steps without deep
  # supervision reached 10 of 13 organs at Dice 0.5 or more; 1000 steps reached 7, with deep
  # supervision (the default, measured on la-mri) or without, and deep supervision costs 5 % more
  # per step (Testing/BENCHMARKS.md, "Demo").
  "$venv/bin/python" Training/train.py --store "$store" --output "$run" --method "$method" $resume \
      optim.iterations="${DEMO_ITERATIONS:-1500}" data.augment=false network.deep_supervision=0
fi

echo
echo "== 6. the bundle: what it segments, how it was trained, its validation Dice"
"$guidedseg" bundle info "$run/bundle"

echo
echo "== 7. segment the store's test scans (one process, model loaded once)"
if [ -d "$out/segmentations" ]; then
  echo "(reusing $out/segmentations; delete it to segment again)"
else
  "$guidedseg" segment --model "$run/bundle" --input "$store/imagesTs" --output "$out/segmentations"
fi

echo
echo "== 8. evaluate against the test labels: Dice, Jaccard, HD95, ASD; CSV, Markdown, pictures"
rm -rf "$out/evaluation"
"$guidedseg" evaluate --pred "$out/segmentations" --ref "$store" --labels "$run/bundle" --output "$out/evaluation"
echo "(open $out/evaluation/dice.png and $out/evaluation/overlays/ to see the results)"
