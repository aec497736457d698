#!/usr/bin/env bash
# Boots a kernel under qemu (TCG emulation: nested KVM does not work on this machine kind)
# with an initramfs holding busybox, the given files at their own paths (with the shared
# libraries `ldd` names for them) and RUN_SCRIPT as /run.sh, then powers off.
#
#   scripts/boot-kernel.sh KERNEL RUN_SCRIPT OUT CONSOLE FILE_OR_DIR...
#
# /run.sh runs as root with /proc, /sys, /dev, /tmp and the BPF filesystem mounted; what it
# writes to stdout reaches OUT through a second serial port (the kernel's console goes to
# CONSOLE, so the two never mix). The exit status is qemu's; the script's own status is
# printed last to OUT as `run.sh exit N`. UNWOUND_QEMU_TIMEOUT (seconds, default 600) bounds
# the whole boot; UNWOUND_QEMU_MEM (MiB, default 2048) is the guest's memory.
set -euo pipefail
if (($# < 4)); then
    echo "usage: $0 KERNEL RUN_SCRIPT OUT CONSOLE FILE_OR_DIR..." >&2
    exit 2
fi
kernel=$1 run_script=$2 out=$3 console=$4
shift 4
for tool in qemu-system-x86_64 busybox cpio ldd; do
    command -v "$tool" >/dev/null || { echo "$0: $tool not found (scripts/setup.sh installs it)" >&2; exit 2; }
done

stage=$(mktemp -d)
trap '[[ -n ${UNWOUND_QEMU_KEEP:-} ]] || rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,proc,sys,dev,tmp,run,root}
cp "$(command -v busybox)" "$stage/bin/busybox"

# Copies a file to its own path in the stage, and each shared library it needs.
add() {
    local f=$1
    mkdir -p "$stage/$(dirname "$f")"
    cp -L "$f" "$stage/$f"
    # `ldd` prints "name => path (addr)" or "path (addr)" for the interpreter.
    ldd "$f" 2>/dev/null | awk '/=> \//{print $3} /^[ \t]*\/[^ ]* \(0x/{print $1}' | while read -r lib; do
        [[ -e "$stage/$lib" ]] && continue
        mkdir -p "$stage/$(dirname "$lib")"
        cp -L "$lib" "$stage/$lib"
    done
}
for item in "$@"; do
    item=$(realpath -s "$item")
    if [[ -d $item ]]; then
        while IFS= read -r -d '' f; do add "$f"; done < <(find "$item" -type f -print0)
    else
        add "$item"
    fi
done
cp "$run_script" "$stage/run.sh"
chmod +x "$stage/run.sh"
cat >"$stage/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin:/sbin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# /tmp is the initramfs itself (already writable RAM): a tmpfs there would hide files
# the test placed under /tmp, e.g. a checkout in /tmp.
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
ip link set lo up 2>/dev/null
stty -F /dev/ttyS1 raw -echo 2>/dev/null
/run.sh >/dev/ttyS1 2>&1
echo "run.sh exit $?" >/dev/ttyS1
sync
poweroff -f
EOF
chmod +x "$stage/init"
(cd "$stage" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 >"$stage.img"
trap '[[ -n ${UNWOUND_QEMU_KEEP:-} ]] || rm -rf "$stage" "$stage.img"' EXIT

: >"$out"
timeout "${UNWOUND_QEMU_TIMEOUT:-600}" qemu-system-x86_64 \
    -accel tcg,thread=multi -cpu max -smp 2 -m "${UNWOUND_QEMU_MEM:-2048}" \
    -nodefaults -display none -no-reboot \
    -kernel "$kernel" -initrd "$stage.img" \
    -append "console=ttyS0 panic=-1 quiet loglevel=4" \
    -serial "file:$console" -serial "file:$out"
