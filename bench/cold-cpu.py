#!/usr/bin/env python3
# CPU time (user + system, from getrusage of the children) of a cold build of a C
# project's files compiled one by one with Lua's flags: plain gcc, dcache's local cache
# in depend mode, and with DCACHE_DIRECT=0 (the preprocessor path), interleaved file by
# file; each repetition starts from empty DCACHE_DIRs. CPU time is what a machine busy
# with other work distorts least.
# usage: bench/cold-cpu.py DIR DCACHE_BINARY REPS   (DIR: from bench/fetch-lua.sh)
import os, resource, subprocess, shutil, sys, glob, statistics, time
src = sys.argv[1]; dcache = sys.argv[2]; reps = int(sys.argv[3])
work = "/tmp/cpub"; shutil.rmtree(work, ignore_errors=True); shutil.copytree(src, work + "/src")
os.chdir(work + "/src"); time.sleep(1.1)
files = sorted(glob.glob("*.c"))
cflags = ["-O2", "-g", "-Wall", "-DLUA_USE_LINUX", "-MMD"]
def cpu(cmd, env):
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
base = dict(os.environ); base.pop("DCACHE_HOSTS", None); base.pop("DCACHE_LOG", None)
tot = {"gcc": [], "depend": [], "direct0": []}
for rep in range(reps):
    sums = {k: 0.0 for k in tot}
    for k in ("depend", "direct0"):
        shutil.rmtree(work + "/cache-" + k, ignore_errors=True)
    for f in files:
        o = f[:-2] + ".o"
        for k in ("gcc", "depend", "direct0"):
            env = dict(base, DCACHE_DIR=work + "/cache-" + k)
            if k == "direct0": env["DCACHE_DIRECT"] = "0"
            cmd = (["gcc"] if k == "gcc" else [dcache, "gcc"]) + cflags + ["-c", f, "-o", o]
            sums[k] += cpu(cmd, env)
    for k in tot: tot[k].append(sums[k])
    print(f"rep {rep}: " + "  ".join(f"{k} {v:.3f}s" for k, v in sums.items()), flush=True)
m = {k: statistics.median(v) for k, v in tot.items()}
print(f"median CPU seconds over {reps} cold builds of {len(files)} files, compiled one by one:")
for k, v in m.items(): print(f"  {k:8s} {v:7.3f} s  {v / m['gcc']:.3f}x")
