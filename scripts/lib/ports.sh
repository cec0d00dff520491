# Loopback ports for the scripts' servers. Sourced by scripts/soak.sh and scripts/loadtest.sh;
# the one place the shell scripts choose a port (the Rust tests' twin is `free_port` in
# tests/common/redis_server.rs).
#
# A port is drawn outside the kernel's ephemeral range (/proc/sys/net/ipv4/ip_local_port_range,
# 32768–60999 by default): Linux gives ports in that range to outgoing connections as their
# source port, so a port found free there can be taken by any connection (a client of the
# very server about to start) before the server binds it, or while a server is down between
# a kill and its restart on the same port. Outside the range only another program that
# binds that port explicitly can take it. A port is never handed out twice by one script.

# The ports this script has handed out, space-separated.
_ports_given=" "

# free_port NAME: sets the variable NAME to a loopback port outside the ephemeral range that
# nothing listens on (a variable, not printed: a `$(…)` subshell would forget the port given).
free_port() {
    local name=$1 low=32768 high=60999 range port candidates
    if [ -r /proc/sys/net/ipv4/ip_local_port_range ]; then
        read -r low high </proc/sys/net/ipv4/ip_local_port_range
    fi
    # Candidates: 10000..low-1 and high+1..65535 (whichever exist).
    local below=$((low > 10000 ? low - 10000 : 0)) above=$((high < 65535 ? 65535 - high : 0))
    candidates=$((below + above))
    [ "$candidates" -gt 0 ] || { echo "error: no port outside the ephemeral range $low-$high" >&2; return 1; }
    for _ in $(seq 200); do
        range=$(((RANDOM * 32768 + RANDOM) % candidates))
        if [ "$range" -lt "$below" ]; then port=$((10000 + range)); else port=$((high + 1 + range - below)); fi
        case "$_ports_given" in *" $port "*) continue ;; esac
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            _ports_given="$_ports_given$port "
            printf -v "$name" '%s' "$port"
            return
        fi
    done
    echo "error: no free loopback port found outside $low-$high" >&2
    return 1
}
