"""Sample a process's CPU time, the load average and a log's trial-boundary count once a second.

CPU seconds (utime+stime of the process and its waited-for children, from /proc/PID/stat) are much less
sensitive than wall time to the other jobs sharing the 2 cores, so per-trial CPU time is the better basis for a
ratio between two tools run at different moments. Boundaries: the number of lines in LOG matching REGEX.
Usage: python monitor.py PID LOG REGEX OUT.jsonl  (stops when PID exits)
"""

import json
import os
import re
import sys
import time

pid, log, pattern, out = int(sys.argv[1]), sys.argv[2], re.compile(sys.argv[3]), sys.argv[4]
tick = os.sysconf("SC_CLK_TCK")
with open(out, "a") as f:
    while True:
        try:
            with open(f"/proc/{pid}/stat") as s:
                fields = s.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            break
        cpu = sum(int(x) for x in fields[11:15]) / tick  # utime, stime, cutime, cstime
        with open(log, errors="replace") as g:
            text = g.read()
        n = len(pattern.findall(text))
        f.write(json.dumps({"t": time.time(), "cpu_s": cpu, "load1": os.getloadavg()[0], "boundaries": n}) + "\n")
        f.flush()
        time.sleep(1)
