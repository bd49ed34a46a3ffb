#!/bin/sh
# nicsim guest /init (busybox sh, PID 1).
#
# Owns the guest side of the kernel command line contract (docs/ARCHITECTURE.md): mount the pseudo
# filesystems, load the virtio-net and pktgen modules, configure eth0 from nicsim.mac= / nicsim.ip= /
# nicsim.mtu= and each further NIC from nicsim.ethN.mac= / .ip= / .mtu=, forward IPv4 between them if
# nicsim.forward=1, add each nicsim.route=NETWORK,via=GATEWAY (repeatable), print NICSIM-READY, run each workload of nicsim.run= (";" between workloads, ","
# between key=value params) printing one "NICSIM-RESULT {json}" line each, then NICSIM-DONE and power
# off. Every workload runs in its own session under a deadline, so a stuck one is killed with all
# its children and reported as a failure instead of hanging the boot.
#
# Re-invoked as "/init --workload INDEX NAME PARAMS" to run one workload in a child process.

PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PATH
set -f # workload specs are split on ; and , and must never be glob-expanded
IFACE=eth0
WORK=/tmp/nicsim

# ---------------------------------------------------------------- JSON helpers (both modes)

# Escape a string for a JSON string literal; control characters are dropped, not escaped.
jstr() { printf '%s' "$1" | tr -d '[:cntrl:]' | sed 's/\\/\\\\/g; s/"/\\"/g'; }

isnum() {
    printf '%s' "$1" | grep -Eq '^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$'
}

# Result fields are appended, one formatted "key": value per line, to $FIELDS.
put_str() { printf '"%s": "%s"\n' "$1" "$(jstr "$2")" >>"$FIELDS"; }
put_num() { if isnum "$2"; then printf '"%s": %s\n' "$1" "$2" >>"$FIELDS"; else printf '"%s": null\n' "$1" >>"$FIELDS"; fi; }
put_raw() { printf '"%s": %s\n' "$1" "$2" >>"$FIELDS"; }
put_bool() { if [ "$2" = 1 ]; then put_raw "$1" true; else put_raw "$1" false; fi; }

# ---------------------------------------------------------------- workload child mode

# Parameter with default: p NAME DEFAULT (params arrive as P_<name> variables).
p() { eval "_v=\${P_$1-}"; if [ -n "$_v" ]; then printf '%s' "$_v"; else printf '%s' "$2"; fi; }

fail() { printf '%s' "$*" >"$ERRFILE"; exit 1; }
need_num() { isnum "$2" || fail "parameter $1 must be a number, got '$2'"; }
need_iface() { [ -d /sys/class/net/$IFACE ] || fail "no $IFACE (no virtio-net device?)"; }
uptime_s() { cut -d ' ' -f 1 /proc/uptime; }
stat_of() { cat /sys/class/net/$IFACE/statistics/$1; }
# Icmp InEchoReps of /proc/net/snmp (the value under the header line's InEchoReps column).
icmp_in_echo_reps() {
    awk '$1 == "Icmp:" { if (!h) { for (i = 2; i <= NF; i++) if ($i == "InEchoReps") c = i; h = 1 } else print $c }' \
        /proc/net/snmp
}

# eth0's rx_packets rx_bytes rx_dropped, then Ip InReceives InHdrErrors and Udp InDatagrams NoPorts
# InCsumErrors of /proc/net/snmp, read by one awk so that they are close to one instant (frames keep
# arriving).
rx_counters() {
    awk 'FNR == 1 && FILENAME != "/proc/net/snmp" { rx = rx " " $1; next }
        $1 == "Ip:" || $1 == "Udp:" { if (!(($1) in h)) { h[$1] = 1; for (i = 2; i <= NF; i++) c[$1 $i] = i; next }
            if ($1 == "Ip:") { ir = $(c["Ip:InReceives"]); ih = $(c["Ip:InHdrErrors"]) }
            else { ud = $(c["Udp:InDatagrams"]); un = $(c["Udp:NoPorts"]); uc = $(c["Udp:InCsumErrors"]) } }
        END { print rx, ir + 0, ih + 0, ud + 0, un + 0, uc + 0 }' \
        /sys/class/net/$IFACE/statistics/rx_packets /sys/class/net/$IFACE/statistics/rx_bytes \
        /sys/class/net/$IFACE/statistics/rx_dropped /proc/net/snmp
}

w_sleep() {
    s=$(p seconds 1); need_num seconds "$s"
    sleep "$s" || fail "sleep $s failed"
    put_num seconds "$s"
}

w_shell() {
    echo "nicsim: interactive shell; exit it to continue with the next workload" >/dev/console
    setsid cttyhack sh -l </dev/console >/dev/console 2>&1
    put_num exit_status "$?"
}

# Virtio-net feature bit names (virtio 1.2 §5.1.3 and §6), for the bits a person looks for.
feature_name() {
    case $1 in
    0) echo CSUM ;; 1) echo GUEST_CSUM ;; 2) echo CTRL_GUEST_OFFLOADS ;; 3) echo MTU ;; 5) echo MAC ;;
    6) echo GSO ;; 7) echo GUEST_TSO4 ;; 8) echo GUEST_TSO6 ;; 9) echo GUEST_ECN ;; 10) echo GUEST_UFO ;;
    11) echo HOST_TSO4 ;; 12) echo HOST_TSO6 ;; 13) echo HOST_ECN ;; 14) echo HOST_UFO ;;
    15) echo MRG_RXBUF ;; 16) echo STATUS ;; 17) echo CTRL_VQ ;; 18) echo CTRL_RX ;; 19) echo CTRL_VLAN ;;
    20) echo CTRL_RX_EXTRA ;; 21) echo GUEST_ANNOUNCE ;; 22) echo MQ ;; 23) echo CTRL_MAC_ADDR ;;
    24) echo NOTIFY_ON_EMPTY ;; 27) echo ANY_LAYOUT ;; 28) echo INDIRECT_DESC ;; 29) echo EVENT_IDX ;;
    32) echo VERSION_1 ;; 33) echo ACCESS_PLATFORM ;; 34) echo RING_PACKED ;; 35) echo IN_ORDER ;;
    36) echo ORDER_PLATFORM ;; 37) echo SR_IOV ;; 38) echo NOTIFICATION_DATA ;; 40) echo RING_RESET ;;
    53) echo NOTF_COALESCE ;; 57) echo HASH_REPORT ;; 60) echo RSS ;; 61) echo RSC_EXT ;;
    62) echo STANDBY ;; 63) echo SPEED_DUPLEX ;;
    esac
}

w_link() {
    IFACE=$(p dev $IFACE) # dev=eth1: another NIC
    need_iface
    d=/sys/class/net/$IFACE
    carrier=$(cat $d/carrier 2>/dev/null || echo 0)
    # The kernel publishes operstate from a deferred work item (up to ~1 s after carrier): let it settle.
    n=0
    while [ "$carrier" = 1 ] && [ "$(cat $d/operstate)" != up ] && [ $n -lt 40 ]; do
        usleep 50000
        n=$((n + 1))
    done
    put_bool carrier "$carrier"
    put_str operstate "$(cat $d/operstate)"
    put_num mtu "$(cat $d/mtu)"
    put_str mac "$(cat $d/address)"
    put_str dev "$IFACE"
    put_str ip "$(ip -4 -o addr show dev $IFACE | awk '{ print $4; exit }')"
    put_str driver "$(basename "$(readlink $d/device/driver 2>/dev/null)" 2>/dev/null)"
    features=$(cat $d/device/features 2>/dev/null) || fail "no virtio feature bits in $d/device/features"
    put_str features "$features"
    bits="" names=""
    i=0
    while [ $i -lt ${#features} ]; do
        if [ "${features:$i:1}" = 1 ]; then
            bits="$bits${bits:+, }$i"
            n=$(feature_name $i)
            [ -n "$n" ] && names="$names${names:+, }\"$n\""
        fi
        i=$((i + 1))
    done
    put_raw feature_bits "[$bits]"
    put_raw feature_names "[$names]"
}

w_ping() {
    target=$(p target 10.0.2.2) count=$(p count 3) interval=$(p interval 1)
    need_num count "$count"; need_num interval "$interval"
    put_str target "$target"
    r0=$(icmp_in_echo_reps) p0=$(stat_of rx_packets 2>/dev/null) d0=$(stat_of rx_dropped 2>/dev/null)
    set -- -c "$count" -i "$interval" -W 2
    # size=N: N bytes of ICMP payload (an IPv4 packet of N + 28 bytes; 8972 fills an MTU of 9000).
    size=$(p size "")
    [ -z "$size" ] || { need_num size "$size"; set -- "$@" -s "$size"; }
    # adaptive=1: the next request as soon as the reply is in (one outstanding, back to back).
    [ "$(p adaptive 0)" != 1 ] || set -- "$@" -A
    out=$(ping "$@" "$target" 2>&1)
    echo "$out"
    tx=$(echo "$out" | sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p')
    rx=$(echo "$out" | sed -n 's/.*transmitted, \([0-9]*\) packets received.*/\1/p')
    loss=$(echo "$out" | sed -n 's/.* \([0-9.]*\)% packet loss.*/\1/p')
    [ -n "$tx" ] || fail "ping gave no summary: $(echo "$out" | tail -n 1)"
    put_num transmitted "$tx"; put_num received "$rx"; put_num loss_pct "$loss"
    # What reached the guest's stack meanwhile (echo replies seen by ICMP; eth0 frames and drops).
    put_num icmp_in_echo_reps $(($(icmp_in_echo_reps) - r0))
    [ -z "$p0" ] || put_num rx_packets $(($(stat_of rx_packets) - p0))
    [ -z "$d0" ] || put_num rx_dropped $(($(stat_of rx_dropped) - d0))
    dup=$(echo "$out" | sed -n 's/.* \([0-9]*\) duplicates,.*/\1/p')
    put_num duplicates "${dup:-0}"
    if [ "$(p seqs 0)" = 1 ]; then
        # Every reply's sequence number in arrival order, duplicates included: with transmitted, a
        # peer can tell which requests were lost and which replies came twice.
        seqs=$(echo "$out" | sed -n 's/^[0-9]* bytes from .*: seq=\([0-9]*\) .*/\1/p' | tr '\n' ',')
        put_raw seqs "[${seqs%,}]"
    fi
    if [ "$(p rtts 0)" = 1 ]; then
        # Every reply's RTT in ms as ping printed it, in arrival order: the host computes percentiles.
        rtts=$(echo "$out" | sed -n 's/^[0-9]* bytes from .* time=\([0-9.]*\) ms.*/\1/p' | tr '\n' ',')
        put_raw rtt_ms "[${rtts%,}]"
    fi
    rtt=$(echo "$out" | sed -n 's#.*min/avg/max = \([0-9.]*\)/\([0-9.]*\)/\([0-9.]*\) ms.*#\1 \2 \3#p')
    set -- $rtt
    put_num rtt_min_ms "${1-}"; put_num rtt_avg_ms "${2-}"; put_num rtt_max_ms "${3-}"
    [ "${rx:-0}" -gt 0 ] || fail "no reply from $target"
}

# Write one pktgen command and check pktgen's verdict (it reports errors in the file, not via write).
pg() {
    echo "$2" >"$1" 2>/dev/null
    grep -q '^Result: OK' "$1" || fail "pktgen: '$2' -> $(grep '^Result' "$1")"
}

# A peer that boots later than this guest (a lab's guests boot at once): ping it once a second until
# it answers, for at most `timeout` seconds, so that the workloads after this one find it up.
w_wait_for() {
    target=$(p target "") timeout=$(p timeout 60)
    [ -n "$target" ] || fail "wait-for needs target=ADDRESS"
    need_num timeout "$timeout"
    put_str target "$target"
    t0=$(uptime_s) tries=0
    until ping -c 1 -W 1 "$target" >/dev/null 2>&1; do
        tries=$((tries + 1))
        waited=$(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN { printf "%d", b - a }')
        [ "$waited" -lt "$timeout" ] || fail "$target did not answer a ping within $timeout s"
        sleep 0.2
    done
    put_num tries "$tries"
    put_num seconds "$(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN { printf "%.2f", b - a }')"
}

w_pktgen_tx() {
    need_iface
    [ -d /proc/net/pktgen ] || fail "pktgen module not loaded"
    size=$(p size 60) count=$(p count 0) duration=$(p duration "")
    dst=$(p dst 10.0.2.2) dst_mac=$(p dst_mac ff:ff:ff:ff:ff:ff) clone=$(p clone_skb 1000)
    need_num size "$size"; need_num count "$count"; need_num clone_skb "$clone"
    [ "$count" -gt 0 ] || [ -n "$duration" ] || duration=5
    [ -z "$duration" ] || need_num duration "$duration"
    thread=/proc/net/pktgen/kpktgend_0 dev=/proc/net/pktgen/$IFACE
    echo rem_device_all >$thread
    echo "add_device $IFACE" >$thread
    [ -e $dev ] || fail "pktgen: could not add $IFACE"
    if [ -n "$duration" ]; then pg $dev "count 0"; else pg $dev "count $count"; fi
    pg $dev "clone_skb $clone"
    pg $dev "pkt_size $size"
    pg $dev "delay 0"
    pg $dev "dst $dst"
    pg $dev "dst_mac $dst_mac"
    # queue=N: every frame on TX queue N (a multiqueue NIC); udp_dst=P: to UDP port P (7: echoed);
    # udp_src=P: from UDP port P (pktgen's default is 9).
    queue=$(p queue "") udp_dst=$(p udp_dst "") udp_src=$(p udp_src "")
    [ -z "$udp_src" ] || { need_num udp_src "$udp_src"; pg $dev "udp_src_min $udp_src"; pg $dev "udp_src_max $udp_src"; }
    [ -z "$queue" ] || { need_num queue "$queue"; pg $dev "queue_map_min $queue"; pg $dev "queue_map_max $queue"; }
    [ -z "$udp_dst" ] || { need_num udp_dst "$udp_dst"; pg $dev "udp_dst_min $udp_dst"; pg $dev "udp_dst_max $udp_dst"; }
    if [ -n "$duration" ]; then
        # count 0 runs forever: start in the background, stop through pgctrl after the duration.
        echo start >/proc/net/pktgen/pgctrl &
        starter=$!
        sleep "$duration"
        echo stop >/proc/net/pktgen/pgctrl
        wait $starter
    else
        echo start >/proc/net/pktgen/pgctrl
    fi
    res=$(grep -A 1 '^Result: OK' $dev)
    echo "$res"
    usec=$(echo "$res" | sed -n 's/^Result: OK: \([0-9]*\)(.*/\1/p')
    pkts=$(echo "$res" | sed -n 's/.* usec, \([0-9]*\) (.*/\1/p')
    errors=$(echo "$res" | sed -n 's/.*errors: \([0-9]*\).*/\1/p')
    [ -n "$usec" ] && [ -n "$pkts" ] || fail "pktgen gave no result: $(grep '^Result' $dev)"
    put_num size "$size"; put_num packets "$pkts"; put_num bytes $((pkts * size)); put_num errors "$errors"
    put_num tx_queues "$(ls /sys/class/net/$IFACE/queues | grep -c "^tx-")"
    put_num seconds "$(awk -v u="$usec" 'BEGIN { printf "%.6f", u / 1e6 }')"
    put_num pps "$(awk -v u="$usec" -v n="$pkts" 'BEGIN { printf "%.1f", (u > 0 ? n * 1e6 / u : 0) }')"
    echo rem_device_all >$thread
}

w_rx_count() {
    need_iface
    duration=$(p duration 5) stall=$(p stall 0); need_num duration "$duration"; need_num stall "$stall"
    # What the stack made of the frames too: UDP datagrams delivered to a socket or to none, UDP
    # checksum errors (the guest verifies checksums: nicsim offers no GUEST_CSUM), bad IPv4 headers.
    u0=$(rx_counters)
    p0=$(stat_of rx_packets) b0=$(stat_of rx_bytes) d0=$(stat_of rx_dropped) t0=$(uptime_s)
    # Tell a peer waiting on the console that counting has started (workload stdout goes to a log).
    echo "nicsim: rx-count: counting for $duration s" >/dev/console
    if [ "$stall" != 0 ]; then
        # stall=S: eth0 down for S s first. Its RX buffers stay posted and the device fills them, but
        # the guest reads none until eth0 is up again: frames held in guest memory (a migration test
        # reads them on the destination, where a page the device wrote and did not log is stale).
        ip link set $IFACE down || fail "cannot set $IFACE down"
        echo "nicsim: rx-count: stalled for $stall s" >/dev/console
        sleep "$stall"
        ip link set $IFACE up || fail "cannot set $IFACE up"
        echo "nicsim: rx-count: receiving" >/dev/console
    fi
    sleep "$duration"
    p1=$(stat_of rx_packets) b1=$(stat_of rx_bytes) d1=$(stat_of rx_dropped) t1=$(uptime_s)
    u1=$(rx_counters)
    set -- $u0 $u1
    # Over the same window as each other (not quite as packets above): frames eth0 counted, what IP
    # received of them, and what became of them in UDP; a frame the stack could not parse is missing.
    put_num stack_rx_packets $(($9 - $1)); put_num stack_rx_bytes $((${10} - $2))
    put_num stack_rx_dropped $((${11} - $3)); put_num ip_in_receives $((${12} - $4))
    put_num ip_in_hdr_errors $((${13} - $5)); put_num udp_in_datagrams $((${14} - $6))
    put_num udp_no_ports $((${15} - $7)); put_num udp_in_csum_errors $((${16} - $8))
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
    put_num packets $((p1 - p0)); put_num bytes $((b1 - b0)); put_num dropped $((d1 - d0))
    put_num seconds "$secs"; put_num stall "$stall"
    put_num pps "$(awk -v n=$((p1 - p0)) -v s="$secs" 'BEGIN { printf "%.1f", (s > 0 ? n / s : 0) }')"
}

# For a host that runs several trials in one boot (nicsim bench --ndr): eth0's receive counter on the
# console every `interval` seconds, for `duration` seconds, as "nicsim: rx-watch SEQ RX_PACKETS RX_DROPPED".
# A trial's count is the difference of two lines that bracket it. The host usually ends the guest
# before the duration is up.
w_rx_watch() {
    need_iface
    duration=$(p duration 600) interval=$(p interval 0.2)
    need_num duration "$duration"; need_num interval "$interval"
    lines=$(awk -v d="$duration" -v i="$interval" 'BEGIN { printf "%d", (i > 0 ? d / i : 1) }')
    stats=/sys/class/net/$IFACE/statistics seq=0
    # Shell builtins only in the loop (read, echo): no fork that would take the guest's CPU from its
    # receive path while a trial runs; sleep is the one program it starts.
    while [ $seq -lt "$lines" ]; do
        read -r pk <$stats/rx_packets; read -r dr <$stats/rx_dropped
        echo "nicsim: rx-watch $seq $pk $dr" >/dev/console
        seq=$((seq + 1))
        sleep "$interval"
    done
    put_num lines "$seq"
}

# iperf3's -J document goes to the host whole, as one line, and the host reads the numbers out of it
# (qemu.testvm.workload): JSON is parsed where there is a JSON parser, not in awk.
iperf_report() {
    doc=$(tr -d '\n\r\t' <"$1")
    case $doc in
    "{"*"}") put_raw iperf3 "$doc" ;;
    *) fail "iperf3 failed: $(tail -n 1 "$2")" ;;
    esac
}

w_iperf3_client() {
    server=$(p server 10.0.2.2) time=$(p time 5) proto=$(p proto tcp) reverse=$(p reverse 0)
    need_num time "$time"
    set -- -c "$server" -t "$time" -J -i 0 --connect-timeout 5000
    case $proto in tcp) ;; udp) set -- "$@" -u ;; *) fail "proto must be tcp or udp, got '$proto'" ;; esac
    case $reverse in 0) ;; 1) set -- "$@" -R ;; *) fail "reverse must be 0 or 1, got '$reverse'" ;; esac
    [ -z "$(p length "")" ] || set -- "$@" -l "$(p length "")"
    [ -z "$(p bandwidth "")" ] || set -- "$@" -b "$(p bandwidth "")"
    [ -z "$(p port "")" ] || set -- "$@" -p "$(p port "")"
    [ -z "$(p parallel "")" ] || set -- "$@" -P "$(p parallel "")"
    put_str server "$server"; put_str proto "$proto"; put_num reverse "$reverse"
    iperf3 "$@" >"$WORK/iperf.$IDX.json" 2>"$WORK/iperf.$IDX.err"
    iperf_report "$WORK/iperf.$IDX.json" "$WORK/iperf.$IDX.err"
}

w_iperf3_server() {
    set -- -s -1 -J -i 0
    [ -z "$(p port "")" ] || set -- "$@" -p "$(p port "")"
    iperf3 "$@" >"$WORK/iperf.$IDX.json" 2>"$WORK/iperf.$IDX.err"
    iperf_report "$WORK/iperf.$IDX.json" "$WORK/iperf.$IDX.err"
}

# UDP request/response: sockperf's ping-pong client, one message outstanding (the next request as
# soon as the reply is in), against a `sockperf server` at server:port, for `time` whole seconds (its
# 400 ms warm-up and 50 ms cool-down included, and left out of its statistics). Its report lines go
# to the host as printed (qemu.testvm.sockperf parses them): the numbers are read where the parser
# can be tested, not in awk. sockperf exits with 0 even when no reply came: the host decides.
w_sockperf_ping_pong() {
    server=$(p server 10.0.2.2) port=$(p port 11111) time=$(p time 2) size=$(p size 64)
    need_num port "$port"; need_num time "$time"; need_num size "$size"
    put_str server "$server"; put_num port "$port"; put_num size "$size"
    out=$WORK/sockperf.$IDX
    # --full-rtt: round trips, as ping reports them (sockperf's default is half of one).
    sockperf ping-pong -i "$server" -p "$port" -t "$time" -m "$size" --mps=max --full-rtt \
        >"$out" 2>&1
    rc=$?
    lines=""
    while IFS= read -r ln; do
        case $ln in sockperf:*) lines="$lines${lines:+, }\"$(jstr "$ln")\"" ;; esac
    done <"$out"
    put_raw sockperf "[$lines]"
    put_num exit_status "$rc"
    [ $rc -eq 0 ] || fail "sockperf exited with status $rc: $(tail -n 1 "$out")"
}

# A block device (dev=, default vda: the disk image given with TestVM(disk=...) or nicsim vm --disk):
# its size, whether it is read-only, and its first 16 bytes in hex. write=TEXT first writes TEXT at
# its start and reads it back past the page cache (QEMU opens the image with snapshot=on, so the
# host's file stays as it was).
w_disk() {
    dev=$(p dev vda)
    case $dev in '' | *[!a-z0-9]*) fail "dev must be a block device name such as vda, got '$dev'" ;; esac
    [ -b /dev/$dev ] || fail "no block device /dev/$dev (no disk attached, or no virtio_blk)"
    put_str dev "$dev"
    put_num bytes $(($(cat /sys/block/$dev/size) * 512))
    put_bool read_only "$(cat /sys/block/$dev/ro)"
    text=$(p write "")
    if [ -n "$text" ]; then
        printf '%s' "$text" | dd of=/dev/$dev conv=notrunc,fsync 2>/dev/null || fail "cannot write /dev/$dev"
        sync
        echo 3 >/proc/sys/vm/drop_caches
        put_str wrote "$text"
    fi
    put_str head "$(od -A n -t x1 -N 16 /dev/$dev | tr -d ' \n')"
}

run_workload() {
    IDX=$1 name=$2 params=$3
    FIELDS=$WORK/fields.$IDX ERRFILE=$WORK/error.$IDX
    old_ifs=$IFS; IFS=,
    for kv in $params; do
        k=${kv%%=*} v=${kv#*=}
        k=$(printf '%s' "$k" | tr - _)
        case $k in '' | *[!a-z0-9_]*) fail "bad parameter '$kv'" ;; esac
        [ "$kv" != "$k" ] || fail "parameter '$kv' has no value"
        eval "P_$k=\$v"
    done
    IFS=$old_ifs
    case $name in
    sleep) w_sleep ;;
    shell) w_shell ;;
    link) w_link ;;
    ping) w_ping ;;
    wait-for) w_wait_for ;;
    pktgen-tx) w_pktgen_tx ;;
    rx-count) w_rx_count ;;
    rx-watch) w_rx_watch ;;
    iperf3-client) w_iperf3_client ;;
    iperf3-server) w_iperf3_server ;;
    sockperf-ping-pong) w_sockperf_ping_pong ;;
    disk) w_disk ;;
    *) fail "unknown workload '$name'" ;;
    esac
    exit 0
}

if [ "${1-}" = --workload ]; then
    run_workload "$2" "$3" "${4-}"
fi

# ---------------------------------------------------------------- PID 1 mode

# poweroff -f does not wait for the serial port to send what is still in the tty's buffer: a long
# result line (iperf3's JSON) would be cut, and NICSIM-DONE lost, by the power-off. Wait until the
# UART's transmit count (/proc/tty/driver/serial, port 0) has stopped moving, for at most 5 s.
drain_console() {
    last= tries=0
    while [ $tries -lt 100 ]; do
        now=$(sed -n 's/^0:.* tx:\([0-9]*\).*/\1/p' /proc/tty/driver/serial 2>/dev/null)
        [ -z "$now" ] && return
        [ "$now" = "$last" ] && return
        last=$now tries=$((tries + 1))
        sleep 0.05
    done
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mkdir -p $WORK
# Only critical kernel messages on the console, so result lines are not interleaved with noise.
echo 2 >/proc/sys/kernel/printk
hostname nicsim-guest

while read -r ko; do
    insmod "$ko" || echo "nicsim: insmod $ko failed" >/dev/console
done </lib/nicsim/modules.order

cmdline_value() { for w in $(cat /proc/cmdline); do case $w in "$1="*) printf '%s' "${w#*=}" ;; esac; done; }
# Every value of a parameter that may repeat, one a line.
cmdline_values() { for w in $(cat /proc/cmdline); do case $w in "$1="*) echo "${w#*=}" ;; esac; done; }
RUN=$(cmdline_value nicsim.run)

# The interface QEMU gave MAC $1 (names follow PCI probe order; the MAC is what the host chose).
iface_with_mac() {
    want=$(printf '%s' "$1" | tr 'A-F' 'a-f')
    for d in /sys/class/net/*; do
        [ "$(cat "$d/address" 2>/dev/null)" != "$want" ] || { basename "$d"; return; }
    done
}

# configure_nic NAME MAC IP MTU: the NIC that has MAC (else NAME, given MAC) up, with IP and MTU.
configure_nic() {
    dev=
    [ -z "$2" ] || dev=$(iface_with_mac "$2")
    if [ -z "$dev" ]; then
        [ -d "/sys/class/net/$1" ] || { echo "nicsim: no $1; running the workloads anyway"; return; }
        dev=$1
        [ -z "$2" ] || ip link set "$dev" address "$2" || echo "nicsim: cannot set MAC $2 on $dev"
    fi
    [ -z "$4" ] || ip link set "$dev" mtu "$4" || echo "nicsim: cannot set MTU $4 on $dev"
    ip link set "$dev" up
    [ -z "$3" ] || ip addr add "$3" dev "$dev" || echo "nicsim: cannot set address $3 on $dev"
    UP_NICS="$UP_NICS $dev"
}

ip link set lo up
UP_NICS=
configure_nic eth0 "$(cmdline_value nicsim.mac)" "$(cmdline_value nicsim.ip)" "$(cmdline_value nicsim.mtu)"
n=1
while [ -n "$(cmdline_value nicsim.eth$n.mac)$(cmdline_value nicsim.eth$n.ip)" ] || [ -d /sys/class/net/eth$n ]; do
    configure_nic eth$n "$(cmdline_value nicsim.eth$n.mac)" "$(cmdline_value nicsim.eth$n.ip)" \
        "$(cmdline_value nicsim.eth$n.mtu)"
    n=$((n + 1))
done
# Carrier normally follows at once; give a slow backend up to 3 s a NIC, then carry on regardless.
for dev in $UP_NICS; do
    n=0
    while [ "$(cat /sys/class/net/$dev/carrier 2>/dev/null)" != 1 ] && [ $n -lt 60 ]; do
        usleep 50000
        n=$((n + 1))
    done
done
if [ "$(cmdline_value nicsim.forward)" = 1 ]; then
    echo 1 >/proc/sys/net/ipv4/ip_forward || echo "nicsim: cannot turn on IPv4 forwarding"
fi
for route in $(cmdline_values nicsim.route); do
    to=${route%%,*} via=${route#*,via=}
    ip route add "$to" via "$via" || echo "nicsim: cannot add route $to via $via"
done
echo NICSIM-READY

# The deadline of a workload: its own duration plus a margin, or timeout= when given.
deadline() {
    name=$1 params=$2
    t=$(echo ",$params," | sed -n 's/.*,timeout=\([0-9]*\),.*/\1/p')
    [ -z "$t" ] || { echo "$t"; return; }
    get() { echo ",$params," | sed -n "s/.*,$1=\([0-9.]*\),.*/\1/p"; }
    case $name in
    ping) awk -v c="$(get count)" -v i="$(get interval)" 'BEGIN { if (c == "") c = 3; if (i == "") i = 1; printf "%d", c * i + 15 }' ;;
    iperf3-client) awk -v t="$(get time)" 'BEGIN { if (t == "") t = 5; printf "%d", t + 20 }' ;;
    iperf3-server) echo 60 ;;
    sockperf-ping-pong) awk -v t="$(get time)" 'BEGIN { if (t == "") t = 2; printf "%d", t + 20 }' ;;
    pktgen-tx | rx-count | rx-watch) awk -v d="$(get duration)" -v s="$(get stall)" 'BEGIN { if (d == "") d = 5; printf "%d", d + s + 60 }' ;;
    sleep) awk -v s="$(get seconds)" 'BEGIN { if (s == "") s = 1; printf "%d", s + 10 }' ;;
    *) echo 15 ;;
    esac
}

idx=0
IFS_SAVE=$IFS
IFS=';'
set -- $RUN
IFS=$IFS_SAVE
for spec in "$@"; do
    [ -n "$spec" ] || continue
    idx=$((idx + 1))
    name=${spec%%,*}
    case $spec in *,*) params=${spec#*,} ;; *) params= ;; esac
    rm -f $WORK/fields.$idx $WORK/error.$idx
    log=$WORK/log.$idx
    if [ "$name" = shell ]; then
        /bin/sh /init --workload $idx "$name" "$params"
        rc=$?
    else
        limit=$(deadline "$name" "$params")
        # Own session => own process group, so the deadline kills the workload and all its children.
        setsid /bin/sh /init --workload $idx "$name" "$params" </dev/null >"$log" 2>&1 &
        pid=$!
        # The verdict is written before the kill, so it is there when wait returns.
        (sleep "$limit"; echo "timed out after $limit s" >$WORK/timeout.$idx; kill -KILL -"$pid" 2>/dev/null) &
        watcher=$!
        wait $pid
        rc=$?
        kill $watcher 2>/dev/null
        wait $watcher 2>/dev/null
        [ -e $WORK/timeout.$idx ] && printf '%s' "$(cat $WORK/timeout.$idx)" >$WORK/error.$idx
    fi
    line="{\"workload\": \"$(jstr "$name")\", \"ok\": "
    if [ $rc -eq 0 ] && [ ! -e $WORK/error.$idx ]; then line="${line}true"; else line="${line}false"; fi
    if [ -e $WORK/fields.$idx ]; then
        while IFS= read -r f; do line="$line, $f"; done <$WORK/fields.$idx
    fi
    if [ $rc -ne 0 ] || [ -e $WORK/error.$idx ]; then
        err=$(cat $WORK/error.$idx 2>/dev/null)
        [ -n "$err" ] || err="exit status $rc: $(tail -n 1 "$log" 2>/dev/null)"
        line="$line, \"error\": \"$(jstr "$err")\""
    fi
    echo "NICSIM-RESULT $line}"
done

echo NICSIM-DONE
sync
drain_console
poweroff -f
# poweroff -f should not return; if it does, PID 1 must not exit (that panics), so wait for the end.
sleep 5
echo o >/proc/sysrq-trigger
while :; do sleep 60; done
