#!/usr/bin/env python3
"""Static check of the Dockerfile against the repository, without a container
engine (scripts/image.sh runs it before building; scripts/test.sh runs it always).

  check_dockerfile.py check --binary PATH   check everything; PATH is a tallyd built
                                             on this machine (run with check-config
                                             and the image's environment)
  check_dockerfile.py facts                  print the image's facts as JSON (user,
                                             config path, data volume, port, …) for
                                             tests that compare manifests with them

What `check` verifies:
  - every file the build stage copies exists and is not excluded by .dockerignore;
  - the copies rebuild the repository's layout under WORKDIR, and cover every
    cargo target (lib, bins, benches, examples, build script) and every file an
    include_str!/include_bytes! in them names, so `cargo build` finds its inputs;
  - the runtime stage copies the binary the build stage builds to the path the
    ENTRYPOINT runs, and the config file to the path the CMD passes to --config;
  - the user is numeric and non-root, created with that uid and gid, and owns the
    working directory, which is the data volume, where the SQLite store is;
  - the HTTP listen address of the image's environment is on all interfaces, on
    the EXPOSEd port;
  - the binary accepts the image's config with the image's environment
    (tallyd check-config) and needs no shared library the base image lacks.
"""

import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shared libraries debian:bookworm-slim has without installing anything (libc6,
# libgcc-s1, zlib1g are required packages). A binary needing more must install
# its package in the runtime stage, and the library belongs here then.
BASE_IMAGE_LIBS = {
    "linux-vdso.so.1", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1",
    "libc.so.6", "libm.so.6", "libdl.so.2", "librt.so.1", "libpthread.so.0",
    "libgcc_s.so.1", "libz.so.1",
}


class Failure(Exception):
    pass


def fail(msg):
    raise Failure(msg)


def instructions(path):
    """The Dockerfile's instructions as (KEYWORD, argument text), continuation
    lines joined and comments dropped."""
    out, cur = [], ""
    with open(path) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not cur and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if cur and line.lstrip().startswith("#"):
                continue
            if line.endswith("\\"):
                cur += line[:-1] + " "
                continue
            cur += line
            word, _, rest = cur.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            cur = ""
    return out


def args_of(text):
    """Arguments of an instruction in JSON (exec) form or shell form."""
    text = text.strip()
    if text.startswith("["):
        return json.loads(text)
    return shlex.split(text)


def stages(instrs):
    result = []
    for word, rest in instrs:
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            result.append({"image": parts[0], "name": name, "instrs": []})
        else:
            result[-1]["instrs"].append((word, rest))
    return result


def env_of(stage):
    env = {}
    for word, rest in stage["instrs"]:
        if word == "ENV":
            for item in shlex.split(rest):
                k, _, v = item.partition("=")
                env[k] = v
    return env


def one(stage, word):
    found = [rest for w, rest in stage["instrs"] if w == word]
    if len(found) != 1:
        fail(f"the {stage['name'] or 'runtime'} stage must have one {word}, has {len(found)}")
    return found[0]


def option(text, flag):
    m = re.search(rf"{flag}[ =](\S+)", text)
    return m.group(1) if m else None


def facts():
    """What the image is: where things are, who runs them."""
    # DOCKERFILE: another file to check against this repository (the tests
    # check that broken variants fail).
    st = stages(instructions(os.environ.get("DOCKERFILE") or os.path.join(ROOT, "Dockerfile")))
    build = next((s for s in st if s["name"] == "build"), None)
    if build is None or st[-1] is build:
        fail("expected a build stage (FROM … AS build) and a runtime stage after it")
    runtime = st[-1]
    env = env_of(runtime)
    entrypoint = args_of(one(runtime, "ENTRYPOINT"))
    cmd = args_of(one(runtime, "CMD"))
    user = one(runtime, "USER")
    runs = " ".join(rest for w, rest in runtime["instrs"] if w == "RUN")
    config = cmd[cmd.index("--config") + 1] if "--config" in cmd else None
    return {
        "build": build,
        "runtime": runtime,
        "base_image": runtime["image"],
        "entrypoint": entrypoint,
        "cmd": cmd,
        "config": config,
        "user": user,
        "useradd_uid": option(runs, "--uid"),
        "useradd_gid": option(runs, "--gid"),
        "groupadd_gid": option(runs.split("useradd")[0], "--gid"),
        "home": option(runs, "--home-dir"),
        "workdir": one(runtime, "WORKDIR"),
        "volumes": [v for w, rest in runtime["instrs"] if w == "VOLUME" for v in args_of(rest)],
        "expose": [p for w, rest in runtime["instrs"] if w == "EXPOSE" for p in rest.split()],
        "env": env,
    }


def dockerignored(rel, patterns):
    ignored = False
    for p in patterns:
        neg = p.startswith("!")
        p = p.lstrip("!").strip("/")
        if fnmatch.fnmatch(rel, p) or rel.startswith(p + "/"):
            ignored = not neg
    return ignored


def check_build_stage(f):
    build = f["build"]
    workdir = one(build, "WORKDIR").rstrip("/")
    ignore_file = os.path.join(ROOT, ".dockerignore")
    patterns = []
    if os.path.exists(ignore_file):
        with open(ignore_file) as fh:
            patterns = [l.strip() for l in fh if l.strip() and not l.startswith("#")]
    copied = []  # repository paths now at the same place under WORKDIR
    for word, rest in build["instrs"]:
        if word != "COPY":
            continue
        if "--from" in rest:
            fail(f"build stage: COPY {rest}: copies from another stage")
        items = args_of(rest)
        *sources, dest = items
        for s in sources:
            rel = os.path.normpath(s)
            if not os.path.exists(os.path.join(ROOT, rel)):
                fail(f"build stage: COPY {rest}: {s} does not exist in the repository")
            if dockerignored(rel, patterns):
                fail(f"build stage: COPY {rest}: {s} is excluded by .dockerignore")
            if dest.endswith("/") or len(sources) > 1:
                target = os.path.normpath(os.path.join(workdir, dest, os.path.basename(rel)))
            else:
                target = os.path.normpath(os.path.join(workdir, dest))
            if target != os.path.normpath(os.path.join(workdir, rel)):
                fail(f"build stage: COPY {rest}: {s} lands at {target}, not {workdir}/{rel}: "
                     "the sources' relative paths would break")
            copied.append(rel)

    def inside(rel):
        rel = os.path.normpath(rel)
        return any(rel == c or rel.startswith(c + "/") for c in copied)

    meta = json.loads(subprocess.check_output(
        ["cargo", "metadata", "--no-deps", "--format-version", "1", "--offline"],
        cwd=ROOT, stdin=subprocess.DEVNULL))
    with open(os.path.join(ROOT, "Cargo.toml")) as fh:
        declared_tests = "[[test]]" in fh.read()
    for pkg in meta["packages"]:
        for t in pkg["targets"]:
            # Tests are found in tests/ when it is there; only declared ones
            # must be.
            if t["kind"] == ["test"] and not declared_tests:
                continue
            rel = os.path.relpath(t["src_path"], ROOT)
            if not inside(rel):
                fail(f"cargo target {t['name']} ({'/'.join(t['kind'])}) is {rel}, which the build stage does not copy")
    for c in copied:
        base = os.path.join(ROOT, c)
        files = [base] if os.path.isfile(base) else [
            os.path.join(d, n) for d, _, names in os.walk(base) for n in names]
        for path in files:
            if not path.endswith(".rs"):
                continue
            with open(path) as fh:
                text = fh.read()
            for m in re.finditer(r'include_(?:str|bytes)!\(\s*"([^"]+)"\s*\)', text):
                target = os.path.relpath(os.path.normpath(os.path.join(os.path.dirname(path), m.group(1))), ROOT)
                if not inside(target):
                    fail(f"{os.path.relpath(path, ROOT)} includes {target}, which the build stage does not copy")
    build_cmd = " ".join(rest for w, rest in build["instrs"] if w == "RUN" and "cargo build" in rest)
    binary = option(build_cmd, "--bin")
    if not binary or "--release" not in build_cmd:
        fail("build stage: expected RUN cargo build --release … --bin NAME")
    return workdir, binary


def check(binary_path):
    f = facts()
    workdir, binary = check_build_stage(f)
    runtime = f["runtime"]
    # The binary: built there, copied here, run by the ENTRYPOINT.
    built = f"{workdir}/target/release/{binary}"
    froms = [args_of(rest.replace("--from=build", "", 1)) for w, rest in runtime["instrs"]
             if w == "COPY" and "--from=build" in rest]
    if [built, f["entrypoint"][0]] not in froms:
        fail(f"runtime stage: expected COPY --from=build {built} {f['entrypoint'][0]} (the ENTRYPOINT); has {froms}")
    # The config: copied from the repository to where the CMD reads it.
    if not f["config"]:
        fail(f"CMD {f['cmd']} passes no --config")
    copies = [args_of(rest) for w, rest in runtime["instrs"] if w == "COPY" and "--from" not in rest]
    config_src = next((src for src, dest in copies if dest == f["config"]), None)
    if config_src is None or not os.path.isfile(os.path.join(ROOT, config_src)):
        fail(f"runtime stage: nothing copies a repository file to {f['config']}, the CMD's --config")
    # The user: numeric, not root, created with those ids.
    m = re.fullmatch(r"(\d+):(\d+)", f["user"])
    if not m or m.group(1) == "0":
        fail(f"USER {f['user']}: must be a numeric non-root uid:gid (Kubernetes' runAsNonRoot checks it)")
    uid, gid = m.groups()
    if (f["useradd_uid"], f["useradd_gid"], f["groupadd_gid"]) != (uid, gid, gid):
        fail(f"USER {f['user']}: the runtime stage must create it (groupadd --gid {gid}, useradd --uid {uid} --gid {gid})")
    # The data directory: the user's home, the working directory, the volume.
    data = f["workdir"]
    if f["home"] != data or f["volumes"] != [data]:
        fail(f"WORKDIR {data}: must be the user's --home-dir ({f['home']}) and the one VOLUME ({f['volumes']})")
    store = f["env"].get("TALLYD_STORE__URL", "")
    if not store.startswith(f"sqlite://{data}/"):
        fail(f"ENV TALLYD_STORE__URL={store}: the default store must be a SQLite file in the volume {data}")
    # HTTP on all interfaces, on the exposed port.
    listen = f["env"].get("TALLYD_HTTP__LISTEN", "")
    host, _, port = listen.rpartition(":")
    if host != "0.0.0.0" or f["expose"] != [port]:
        fail(f"ENV TALLYD_HTTP__LISTEN={listen} with EXPOSE {f['expose']}: must listen on 0.0.0.0 at the exposed port")
    # The binary accepts the image's config and environment, and its libraries
    # are in the base image.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLYD_")}
    env.update(f["env"], RUST_BACKTRACE="0")
    cfg = os.path.join(ROOT, config_src)
    res = subprocess.run([binary_path, "check-config", "--config", cfg], env=env,
                         capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        fail(f"tallyd check-config with the image's config and ENV failed:\n{res.stderr.strip()}")
    ldd = subprocess.run(["ldd", binary_path], capture_output=True, text=True)
    libs = {os.path.basename(l.split()[0]) for l in ldd.stdout.splitlines() if l.strip()}
    missing = sorted(libs - BASE_IMAGE_LIBS)
    if missing:
        fail(f"{binary_path} needs {missing}, which {f['base_image']} does not have: install their "
             "packages in the runtime stage and list the libraries in BASE_IMAGE_LIBS")
    print(f"Dockerfile: ok (user {f['user']}, config {f['config']}, data {data}, "
          f"entrypoint {f['entrypoint'][0]}, port {port}; {len(libs)} shared libraries, all in {f['base_image']})")


def main(argv):
    try:
        if argv[1:2] == ["facts"]:
            f = facts()
            print(json.dumps({k: v for k, v in f.items() if k not in ("build", "runtime")}, indent=2))
        elif argv[1:2] == ["check"] and argv[2:3] == ["--binary"] and len(argv) == 4:
            check(argv[3])
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except Failure as e:
        print(f"Dockerfile: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
