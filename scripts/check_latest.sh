#!/usr/bin/env bash
# Drift check: in a brand-new virtual environment, installs the NEWEST releases that pyproject.toml
# allows (scripts/install.sh without constraints.txt), runs the README's test command, and reports
# which versions differ from the pins and whether the suite passed. --update: when it passed,
# constraints.txt takes the new versions (review and commit the diff).
#   bash scripts/check_latest.sh [--update]        (PYTHON=python3.12 to try another Python)
set -uo pipefail
cd "$(dirname "$0")/.."
update=0
[ "${1:-}" = "--update" ] && update=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"${PYTHON:-python3}" -m venv "$work/venv" || exit 1
source "$work/venv/bin/activate"
echo "== installing the newest releases pyproject.toml allows (fresh venv)"
PYTHON="$work/venv/bin/python" ALTO_CONSTRAINTS= bash scripts/install.sh > "$work/install.log" 2>&1 || {
  tail -30 "$work/install.log"; echo "check_latest: the install FAILED (log above)"; exit 1; }
pip freeze | grep -v '^alto' > "$work/latest.txt"
echo "== versions that differ from constraints.txt (pinned -> newest)"
python - constraints.txt "$work/latest.txt" <<'PY'
import re, sys
def read(path):
    pins = (line.strip().split("==") for line in open(path) if "==" in line and not line.startswith("#"))
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins}
pinned, latest = read(sys.argv[1]), read(sys.argv[2])
for name in sorted(pinned.keys() | latest.keys()):
    if pinned.get(name) != latest.get(name):
        print(f"  {name:<28} {pinned.get(name, '-'):<16} -> {latest.get(name, '-')}")
PY
echo "== the README's test command"
python -m pytest tests -q -p no:cacheprovider > "$work/pytest.log" 2>&1
rc=$?
tail -15 "$work/pytest.log"
if [ $rc -eq 0 ]; then
  echo "check_latest: the newest releases PASS"
  if [ $update = 1 ]; then
    { grep '^#' constraints.txt; cat "$work/latest.txt"; } > "$work/constraints.txt" && cp "$work/constraints.txt" constraints.txt
    echo "constraints.txt updated: review 'git diff constraints.txt' and commit"
  fi
else
  echo "check_latest: the newest releases FAIL (above): fix, or cap the range in pyproject.toml and say why"
fi
exit $rc
