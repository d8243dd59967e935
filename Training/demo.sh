#!/usr/bin/env bash
# The main job on the embedded default: synthetic phantoms into a case store, checked, and one
# annotator's partial correction ingested. Training, segmentation and evaluation join this
# script as they land.   usage: bash Training/demo.sh [VENV] [OUT]
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
  "$guidedseg" phantoms "$store" --cases 20 --labeled 4 --test 4 --seed 0
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
