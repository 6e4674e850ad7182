#!/usr/bin/env bash
# Start, stop or check a local single-node ZooKeeper (Debian's libzookeeper-java + Java 17) on loopback.
#
# Usage: scripts/zookeeper.sh start|stop|status|run [PORT] [DATA_DIR]
#   start   write DATA_DIR/zoo.cfg, launch ZooKeeper in the background (pid in DATA_DIR/zookeeper.pid,
#           log in DATA_DIR/zookeeper.log) and wait until it answers `ruok` with `imok` (exit 1 after 30 s)
#   stop    SIGTERM the server started by `start` (SIGKILL after 10 s) and remove the pid file
#   status  exit 0 and print `imok` when the server on PORT answers, exit 1 otherwise
#   run     write the config and run ZooKeeper in the foreground until SIGTERM/SIGINT (for supervisors and
#           test fixtures; with WATCH_PID=pid it also stops when that process is gone)
# PORT defaults to $ZK_PORT or 2181, DATA_DIR to $ZK_DATA_DIR or /tmp/distill-zookeeper-PORT.
# The server listens on 127.0.0.1 only (or $ZK_ADDRESS), has no admin web server, allows the four-letter words
# ruok,srvr,stat,mntr and accepts session timeouts down to 2 s (minSessionTimeout=2000).
# Environment: ZK_JAR (default /usr/share/java/zookeeper.jar), ZK_HEAP (default 256m), JAVA (default java),
# ZK_LOG_LEVEL (default warn; needs /usr/share/java/slf4j-simple.jar, else the server logs nothing).
set -euo pipefail

command="${1:-}"
port="${2:-${ZK_PORT:-2181}}"
data_dir="${3:-${ZK_DATA_DIR:-/tmp/distill-zookeeper-$port}}"
jar="${ZK_JAR:-/usr/share/java/zookeeper.jar}"
java_bin="${JAVA:-java}"
pid_file="$data_dir/zookeeper.pid"
address="${ZK_ADDRESS:-127.0.0.1}"

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

ruok() {
  # Send the four-letter word `ruok`; a live server answers `imok` and closes the connection.
  local answer=""
  if { exec 3<>"/dev/tcp/$address/$port"; } 2>/dev/null; then
    printf 'ruok' >&3
    answer="$(timeout 2 cat <&3 2>/dev/null || true)"
    exec 3<&- 3>&-
  fi
  [ "$answer" = "imok" ] || return 1
  # `imok` only says the process runs; `srvr` names the mode once the server accepts sessions.
  if { exec 3<>"/dev/tcp/$address/$port"; } 2>/dev/null; then
    printf 'srvr' >&3
    answer="$(timeout 2 cat <&3 2>/dev/null || true)"
    exec 3<&- 3>&-
  fi
  [[ "$answer" == *"Mode: "* ]]
}

write_config() {
  mkdir -p "$data_dir"
  cat >"$data_dir/zoo.cfg" <<EOF
tickTime=1000
initLimit=10
syncLimit=5
dataDir=$data_dir
clientPort=$port
clientPortAddress=$address
admin.enableServer=false
4lw.commands.whitelist=ruok,srvr,stat,mntr
minSessionTimeout=2000
maxSessionTimeout=60000
maxClientCnxns=200
autopurge.snapRetainCount=3
autopurge.purgeInterval=1
EOF
}

java_command() {
  [ -f "$jar" ] || { echo "zookeeper.sh: $jar not found; install libzookeeper-java (scripts/setup.sh)" >&2; exit 1; }
  local classpath="$jar"
  [ -f /usr/share/java/slf4j-simple.jar ] && classpath="$classpath:/usr/share/java/slf4j-simple.jar"
  echo "$java_bin" "-Xmx${ZK_HEAP:-256m}" -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    "-Dorg.slf4j.simpleLogger.defaultLogLevel=${ZK_LOG_LEVEL:-warn}" -Dzookeeper.admin.enableServer=false \
    -cp "$classpath" org.apache.zookeeper.server.quorum.QuorumPeerMain "$data_dir/zoo.cfg"
}

case "$command" in
  run)
    write_config
    # shellcheck disable=SC2046
    $(java_command) &
    java_pid=$!
    trap 'kill -TERM "$java_pid" 2>/dev/null; wait "$java_pid"; exit 0' TERM INT
    # With WATCH_PID set (test fixtures set their own pid), stop the server when that process is gone.
    while kill -0 "$java_pid" 2>/dev/null; do
      if [ -n "${WATCH_PID:-}" ] && ! kill -0 "$WATCH_PID" 2>/dev/null; then
        kill -TERM "$java_pid" 2>/dev/null; wait "$java_pid"; exit 0
      fi
      sleep 0.5 & wait $!
    done
    wait "$java_pid"
    ;;
  start)
    if ruok; then echo "zookeeper.sh: a server already answers on 127.0.0.1:$port" >&2; exit 1; fi
    write_config
    # shellcheck disable=SC2046
    nohup setsid $(java_command) >"$data_dir/zookeeper.log" 2>&1 </dev/null &
    echo $! >"$pid_file"
    for _ in $(seq 1 300); do
      if ruok; then echo "zookeeper.sh: ready on 127.0.0.1:$port (pid $(cat "$pid_file"), data $data_dir)"; exit 0; fi
      if ! kill -0 "$(cat "$pid_file")" 2>/dev/null; then
        echo "zookeeper.sh: server exited; log:" >&2; tail -20 "$data_dir/zookeeper.log" >&2; exit 1
      fi
      sleep 0.1
    done
    echo "zookeeper.sh: not ready after 30 s; log: $data_dir/zookeeper.log" >&2
    exit 1
    ;;
  stop)
    [ -f "$pid_file" ] || { echo "zookeeper.sh: no pid file $pid_file" >&2; exit 1; }
    pid="$(cat "$pid_file")"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || { rm -f "$pid_file"; echo "zookeeper.sh: stopped (pid $pid)"; exit 0; }
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pid_file"
    echo "zookeeper.sh: killed (pid $pid)"
    ;;
  status)
    if ruok; then echo imok; else echo "zookeeper.sh: nothing answers on 127.0.0.1:$port" >&2; exit 1; fi
    ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
