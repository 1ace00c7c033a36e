#!/bin/bash
# kill_after.sh PID MONITOR.jsonl N : SIGINT/SIGTERM the process once the monitor counted N boundaries
while kill -0 $1 2>/dev/null; do
  b=$(tail -1 $2 | python -c "import json,sys;print(json.loads(sys.stdin.read())['boundaries'])")
  if [ "$b" -ge "$3" ]; then kill $1; echo "killed $1 at $(date -u +%T) boundaries $b"; exit; fi
  sleep 2
done
