#!/bin/sh
# A Debian 13 (trixie) root with RabbitMQ 4.0 (native MQTT: no queue per QoS 0 subscription) and Erlang 27,
# which Debian 12 cannot install beside its own RabbitMQ 3.10. bench/fleet_cluster.py --rabbitmq-root DIR
# (or EDGE_RABBITMQ_ROOT=DIR for tests/rabbitmq.py) runs the cluster's nodes in it through chroot(8).
# Root only; ~3 minutes and ~400 MB; safe to run again.
set -eu
root=${1:-/opt/trixie}
if [ ! -x "$root/usr/lib/rabbitmq/bin/rabbitmq-server" ]; then
    command -v debootstrap >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap; }
    [ -x "$root/bin/sh" ] || debootstrap --variant=minbase trixie "$root" http://deb.debian.org/debian
    # no service starts inside the root: the bench starts its own nodes
    printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
    chmod +x "$root/usr/sbin/policy-rc.d"
    chroot "$root" sh -c 'DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends rabbitmq-server'
fi
chroot "$root" sh -c 'ls /usr/lib/rabbitmq/lib | grep rabbitmq_server'
