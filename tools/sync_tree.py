"""Make DST an exact copy of SRC, rewriting only files whose bytes differ.

Used by tools/fetch_llama.sh so that re-applying the patch series leaves the mtime of unchanged
llama.cpp sources alone and the persistent CMake build recompiles only what a patch touched.
"""
from __future__ import annotations

import filecmp
import os
import shutil
import sys


def sync(src: str, dst: str) -> int:
    changed = 0
    for root, dirs, files in os.walk(src):
        rel = os.path.relpath(root, src)
        out = os.path.normpath(os.path.join(dst, rel))
        os.makedirs(out, exist_ok=True)
        for name in files:
            s, d = os.path.join(root, name), os.path.join(out, name)
            if os.path.islink(s):
                if os.path.lexists(d):
                    os.remove(d)
                os.symlink(os.readlink(s), d)
                continue
            if os.path.isfile(d) and not os.path.islink(d) and filecmp.cmp(s, d, shallow=False):
                continue
            if os.path.lexists(d):
                os.remove(d)
            shutil.copy2(s, d)
            os.utime(d)  # a changed file must look newer than the objects built from it
            changed += 1
        # remove what SRC no longer has (a developer's .git baseline inside the tree is kept)
        for name in set(os.listdir(out)) - set(dirs) - set(files) - {".git"}:
            p = os.path.join(out, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.remove(p)
            changed += 1
    return changed


if __name__ == "__main__":
    n = sync(sys.argv[1], sys.argv[2])
    print(f"sync_tree: {n} file(s) changed")
