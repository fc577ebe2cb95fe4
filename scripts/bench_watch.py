"""Watches a running tallyd for scripts/bench-e2e.sh: from its first consumed
message until the store's offsets cover all N messages; prints CDRs/s, the ratio
to the bare consumer, CPU seconds (also per thread) and peak RSS of the process."""
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request

label, url, n, pid, bare_rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
tick = os.sysconf("SC_CLK_TCK")


# PostgreSQL is asked through one psql session kept open for the whole run: a
# psql process and server backend started every 50 ms took a noticeable share of
# the two cores that tallyd and the broker are measured on.
psql = None
if not url.startswith("sqlite://"):
    psql = subprocess.Popen(["psql", url, "-tAqX"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, bufsize=1)


def consumed():
    try:
        if psql is None:
            con = sqlite3.connect(url[len("sqlite://"):], timeout=1)
            row = con.execute("SELECT COALESCE(SUM(next_offset), 0) FROM consumer_offsets").fetchone()
            con.close()
            return int(row[0])
        # Until tallyd has created its tables the query fails (to stderr); the
        # echoed marker ends every answer either way.
        psql.stdin.write("SELECT COALESCE(SUM(next_offset), 0) FROM consumer_offsets;\n\\echo END\n")
        value = 0
        for line in psql.stdout:
            line = line.strip()
            if line == "END":
                break
            if line:
                value = int(line)
        return value
    except Exception:
        return 0


def counted():
    """CDRs tallyd has taken so far (any outcome), from its /metrics at
    $METRICS_URL (0 while it does not answer); None if that is not set."""
    url = os.environ.get("METRICS_URL")
    if not url:
        return None
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            text = r.read().decode()
    except Exception:
        return 0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tallyd_cdrs_total"))


def cpu_seconds(of=None):
    with open(f"/proc/{of or pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick


def thread_cpu():
    """CPU seconds per thread name, busiest first."""
    by_name = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, rest = f.read().rsplit(")", 1)
            name = head.split("(", 1)[1]
            fields = rest.split()
            by_name[name] = by_name.get(name, 0) + (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return sorted(by_name.items(), key=lambda kv: -kv[1])


def peak_rss_mib():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


# Consumption starts after the consumer-group join, which is idle but can take
# 20 s against tansu: the clock starts at the first sampling window in which
# tallyd's /metrics ($METRICS_URL) counts a CDR, or, without it, in which the
# process used at least 40% of a core (which also counts work done before the
# first message, such as loading 30,000 usage triggers while the join goes
# on). BENCH_TRACE=1 prints every sample.
# The broker shares the machine: its CPU over the same window is printed too.
tansu = int(os.environ.get("TANSU_PID", "0"))
deadline = time.time() + 900
start = None
t0 = last_t = time.time()
last_cpu = cpu_seconds()
while time.time() < deadline:
    cpu, now = cpu_seconds(), time.time()
    done = consumed()
    if os.environ.get("BENCH_TRACE"):
        print(f"  {now - t0:6.2f}s cpu {cpu:6.2f} (+{cpu - last_cpu:.2f}) consumed {done}", file=sys.stderr)
    if start is None:
        seen = counted()
        begun = seen > 0 if seen is not None else cpu - last_cpu >= 0.4 * (now - last_t)
    if start is None and (begun or done >= n):
        # A drain short enough to end within one window starts where that
        # window began.
        start = last_t
        tansu_start = cpu_seconds(tansu) if tansu else 0
    last_cpu, last_t = cpu, now
    if done >= n:
        break
    time.sleep(0.05)
else:
    sys.exit(f"{label}: timed out")
secs = time.time() - start
rate = n / secs
print(f"tallyd[{label}]: {n} CDRs consumed, rated and flushed in {secs:.2f} s = {rate:.0f} CDRs/s; "
      f"ratio to bare consumer {rate / bare_rate:.2f}; CPU {cpu_seconds():.1f} s; peak RSS {peak_rss_mib():.0f} MiB")
if tansu:
    print(f"  broker (tansu) CPU meanwhile: {cpu_seconds(tansu) - tansu_start:.1f} s")
print("  CPU by thread: " + ", ".join(f"{name} {secs:.1f} s" for name, secs in thread_cpu()[:6] if secs >= 0.05))
