#!/usr/bin/env bash
# Issue 9's size criterion, like for like: the src tree of 40a76d0 without the three features that came after the
# a6e1da6 tree it was measured on (stage 3's resampling policy, the fewer-scale students, the token cache), against
# a6e1da6 itself. Lines are `wc -l` of every tracked src/*.py, as the issue counted them.
#
#   bash docs/results/core-size/measure.sh          # the two counts (seconds)
#   bash docs/results/core-size/measure.sh --test   # and the test suite on the reduced tree (about 5 min, needs .venv)
#
# Needs the repository's full history (a shallow clone lacks the two commits: git fetch --unshallow).
set -euo pipefail

BEFORE=a6e1da6  # the tree issue 9 counted: 8,690 lines
AT=40a76d0      # main when this was measured (2026-12-04)
# Files that exist only for the later features; later-features.patch removes their hooks in the other files.
LATER_FILES=(src/srdd_lightning/stages/policy.py src/srdd_lightning/models/policy.py
             src/srdd_lightning/stages/student.py src/srdd_lightning/data/tokens.py
             tests/test_policy.py tests/test_student.py tests/test_token_cache.py)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(git -C "$here" rev-parse --show-toplevel)
for rev in "$BEFORE" "$AT"; do
    git -C "$repo" cat-file -e "$rev^{commit}" 2>/dev/null \
        || { echo "measure.sh: commit $rev is not in this clone's history; run git fetch --unshallow" >&2; exit 2; }
done

src_lines() {  # src_lines REV: lines of the tracked src/*.py files at REV
    git -C "$repo" ls-tree -r --name-only "$1" -- src | grep '\.py$' \
        | while read -r f; do git -C "$repo" cat-file blob "$1:$f"; done | wc -l
}

tree=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$tree" 2>/dev/null || rm -rf "$tree"' EXIT
git -C "$repo" worktree add --detach -q "$tree" "$AT"
git -C "$tree" rm -q "${LATER_FILES[@]}"
git -C "$tree" apply "$here/later-features.patch"
reduced=$(cd "$tree" && cat $(git ls-files 'src/*.py') | wc -l)

echo "src at $BEFORE (issue 9's count):                      $(src_lines "$BEFORE")"
echo "src at $AT (everything, policy/students/token cache):  $(src_lines "$AT")"
echo "src at $AT without policy, students, token cache:      $reduced"

if [[ "${1:-}" == "--test" ]]; then
    [[ -x "$repo/.venv/bin/python" ]] || { echo "measure.sh: --test needs $repo/.venv (make install)" >&2; exit 2; }
    (cd "$tree" && PATH="$repo/.venv/bin:$PATH" PYTHONPATH="$tree/src" "$repo/.venv/bin/python" -m pytest -q \
        -p no:cacheprovider tests)
fi
