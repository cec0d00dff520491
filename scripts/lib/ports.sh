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
# Its locals are prefixed so that NAME, even a caller's local such as `port`, is the caller's.
free_port() {
    local _fp_low=32768 _fp_high=60999 _fp_draw _fp_port
    if [ -r /proc/sys/net/ipv4/ip_local_port_range ]; then
        read -r _fp_low _fp_high </proc/sys/net/ipv4/ip_local_port_range
    fi
    # Candidates: 10000..low-1 and high+1..65535 (whichever exist).
    local _fp_below=$((_fp_low > 10000 ? _fp_low - 10000 : 0))
    local _fp_above=$((_fp_high < 65535 ? 65535 - _fp_high : 0))
    local _fp_count=$((_fp_below + _fp_above))
    if [ "$_fp_count" -le 0 ]; then
        echo "error: no port outside the ephemeral range $_fp_low-$_fp_high" >&2
        return 1
    fi
    for _ in $(seq 200); do
        _fp_draw=$(((RANDOM * 32768 + RANDOM) % _fp_count))
        if [ "$_fp_draw" -lt "$_fp_below" ]; then
            _fp_port=$((10000 + _fp_draw))
        else
            _fp_port=$((_fp_high + 1 + _fp_draw - _fp_below))
        fi
        case "$_ports_given" in *" $_fp_port "*) continue ;; esac
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$_fp_port") 2>/dev/null; then
            _ports_given="$_ports_given$_fp_port "
            printf -v "$1" '%s' "$_fp_port"
            return
        fi
    done
    echo "error: no free loopback port found outside $_fp_low-$_fp_high" >&2
    return 1
}
