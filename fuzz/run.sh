#!/usr/bin/env bash
# Runs every fuzz target with deep-nesting and max-size seeds on a 2 MiB stack (a tokio
# worker's) and prints the exec counts as a markdown table for docs/benchmarks.md (issue 12).
#
#   bash fuzz/run.sh                          # all targets, 60 s each, nightly + ASan (the bench)
#   SECS=300 bash fuzz/run.sh amf0 rtmp_session
#   SECS=60 SANITIZER=none bash fuzz/run.sh   # stable, no sanitizer (deploy/test.sh, issue 14)
#
# Environment:
#   SECS       seconds per target, default 60
#   SANITIZER  address (default) or none. address needs a nightly toolchain (cargo-fuzz passes
#              -Zsanitizer=address); none builds with any toolchain, stable included: libFuzzer's
#              coverage instrumentation only, no -Z flag. A panic, an abort, a stack overflow or
#              an out-of-memory still ends the run with a non-zero exit (and, but for a stack
#              overflow, which kills the process by SIGSEGV, a crash-* or oom-* input in
#              fuzz/artifacts/<target>/); what needs ASan (out-of-bounds reads in unsafe code,
#              use after free) goes unseen.
#   TOOLCHAIN  rustup toolchain to run cargo with (cargo +TOOLCHAIN). Default: nightly with
#              SANITIZER=address; with SANITIZER=none, the machine's default toolchain (plain
#              `cargo`, no +TOOLCHAIN, so a rust-toolchain file or `rustup default` decides).
#              TOOLCHAIN=default also means the machine's default.
#   RSS_MB     libFuzzer's -rss_limit_mb, default 2048
# Logs go to fuzz/artifacts/logs/<target>.log, the table also to fuzz/artifacts/logs/table.md;
# crashing inputs to fuzz/artifacts/<target>/ (all of fuzz/artifacts, fuzz/corpus and
# fuzz/target are in fuzz/.gitignore). Exits non-zero if any target failed.
#
# The 2 MiB stack: libFuzzer calls the target on the process's main thread (this script uses
# no -fork or -jobs), and Linux sizes the main thread's stack by RLIMIT_STACK: the stack mapping
# grows on demand and the kernel refuses to grow it past the soft limit (acct_stack_growth in
# the kernel's mm/), a SIGSEGV that ASan reports as a stack overflow. The limit is inherited across
# fork and execve; bash's `ulimit -s` sets the soft and the hard limit, so nothing between this
# shell and the target (rustup's proxy, cargo-fuzz, `cargo run`) can raise it again. Checked on
# this machine (Linux 6.18): bash's own recursion depth scales linearly with `ulimit -s`
# (1024/2048/4096/8192 KiB -> about 1075/2196/4391/8830 levels). The arguments and environment
# sit at the top of the same 2 MiB (a few KiB), which makes it slightly stricter, not looser.
# The script also reads the limit of each running fuzz target from /proc/<pid>/limits and
# prints it in the table. The build runs before, with the normal stack.
#
# ASan (cargo-fuzz's default) gives frames redzones, so frames are larger than in the release
# build: stricter again. Its stack-use-after-return mode would move locals to heap "fake
# stacks", which would make the 2 MiB looser: it is turned off here. With SANITIZER=none the
# frames are the release build's (cargo-fuzz builds with --release, plus debug assertions and
# the coverage instrumentation): the 2 MiB then holds what it holds in production.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT"
SECS=${SECS:-60}
SANITIZER=${SANITIZER:-address}
RSS_MB=${RSS_MB:-2048}
case $SANITIZER in
    address)
        TOOLCHAIN=${TOOLCHAIN:-nightly}
        sanitizer_name=ASan
        ;;
    none)
        TOOLCHAIN=${TOOLCHAIN:-default}
        sanitizer_name="no sanitizer"
        ;;
    *)
        echo "SANITIZER must be address or none, not '$SANITIZER'" >&2
        exit 2
        ;;
esac
# cargo and rustc with the toolchain: `cargo +nightly`, or plain `cargo` for the default one.
plus=()
[[ $TOOLCHAIN == default ]] || plus=("+$TOOLCHAIN")
# The same build options for `cargo fuzz build` and `cargo fuzz run` (which builds again, on the
# 2 MiB stack, if they differ).
fuzz_opts=(--sanitizer "$SANITIZER")
STACK_KIB=2048
ALL=(amf0 rtmp_session rtmp_chunks relay_wire flv_tags)
if (($#)); then targets=("$@"); else targets=("${ALL[@]}"); fi
LOGS=fuzz/artifacts/logs
mkdir -p "$LOGS"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "== installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked --quiet
fi

echo "== seeds" >&2
python3 fuzz/seeds.py >&2

# cargo-fuzz has no --locked: fetching with it first fails if fuzz/Cargo.lock is out of date,
# and with the lock file current the build below leaves it as it is.
# (For the host only, as cargo-fuzz builds for it: not every platform's crates.)
echo "== fetching the fuzz crate's dependencies (--locked)" >&2
host=$(rustc "${plus[@]}" -vV | sed -n 's/^host: //p')
cargo "${plus[@]}" fetch --locked --manifest-path fuzz/Cargo.toml ${host:+--target "$host"} >&2

echo "== building all fuzz targets, $sanitizer_name (normal stack)" >&2
cargo "${plus[@]}" fuzz build "${fuzz_opts[@]}" >&2

if [[ $SANITIZER == address ]]; then
    export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_stack_use_after_return=0"
fi

# Waits for the fuzz target's process and writes its soft stack limit (bytes) to $2.
watch_stack() {
    local t=$1 out=$2 i exe
    for ((i = 0; i < 300; i++)); do
        exe=$(find /proc -mindepth 2 -maxdepth 2 -name exe \
            -lname "$ROOT/fuzz/target/*/release/$t" 2>/dev/null | head -1) || true
        if [[ -n $exe ]]; then
            awk '/^Max stack size/ {print $4}' "${exe%/exe}/limits" >"$out" 2>/dev/null || true
            [[ -s $out ]] && return 0
        fi
        sleep 0.2
    done
}

rows=()
failed=0
for t in "${targets[@]}"; do
    corpus=fuzz/corpus/$t
    [[ -d $corpus ]] || { echo "no corpus for $t (unknown target?)" >&2; exit 2; }
    files=$(find "$corpus" -type f | wc -l)
    largest=$(find "$corpus" -type f -printf '%s\n' | sort -n | tail -1)
    # Seeds longer than -max_len are cut to it (the default is at most 1 MiB), so fit the largest.
    max_len=$((largest > 4096 ? largest : 4096))
    log=$LOGS/$t.log
    stackf=$LOGS/$t.stack
    rm -f "$stackf"
    echo "== $t: $files corpus files, -max_len=$max_len, ${SECS}s, ulimit -s $STACK_KIB" >&2

    watch_stack "$t" "$stackf" &
    watcher=$!
    status=0
    (
        ulimit -s "$STACK_KIB"
        exec cargo "${plus[@]}" fuzz run "${fuzz_opts[@]}" "$t" "$corpus" -- \
            -max_total_time="$SECS" -max_len="$max_len" -rss_limit_mb="$RSS_MB" \
            -print_final_stats=1
    ) >"$log" 2>&1 || status=$?
    kill "$watcher" 2>/dev/null || true
    wait "$watcher" 2>/dev/null || true

    stack=$(cat "$stackf" 2>/dev/null || true)
    wrong_stack=
    if [[ $stack =~ ^[0-9]+$ ]]; then
        stack="$((stack / 1024)) KiB"
        [[ $stack == "$STACK_KIB KiB" ]] || wrong_stack=1
    else
        stack="?"  # not seen (a custom CARGO_TARGET_DIR, or the target ended at once)
    fi

    # libFuzzer's last line on a normal end: "Done N runs in S second(s)".
    done_line=$(grep -E '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -1 || true)
    runs=- secs=- rate=-
    if [[ $done_line =~ ^Done\ ([0-9]+)\ runs\ in\ ([0-9]+)\ second ]]; then
        runs=${BASH_REMATCH[1]}
        secs=${BASH_REMATCH[2]}
        rate=$(awk -v n="$runs" -v s="$secs" 'BEGIN { printf "%.0f", (s > 0 ? n / s : n) }')
    fi
    rss=$(awk '/^stat::peak_rss_mb:/ {print $2}' "$log" | tail -1)
    if [[ -n $wrong_stack ]]; then
        failed=1
        result="FAILED (ran with a $stack stack)"
        echo "!! $t: $result" >&2
    elif ((status == 0)) && [[ $runs != - ]]; then
        result=ok
    else
        failed=1
        artifact=$(grep -oE 'Test unit written to [^ ]+' "$log" | tail -1 | cut -d' ' -f5 || true)
        # What ended it: libFuzzer's or ASan's report (a panic or abort is libFuzzer's "deadly
        # signal"), the panic message, or cargo's note of the signal that killed the target (a
        # stack overflow without ASan: SIGSEGV, no report, no artifact).
        cause_re='ERROR: (libFuzzer|AddressSanitizer): [^(]*[^( ]|panicked at .*'
        cause_re+='|signal: [0-9]+, SIG[A-Z]+'
        cause=$(grep -m1 -oE "$cause_re" "$log" || true)
        cause=${cause%:}
        cause=${cause//|/\\|}  # a cell of the markdown table
        result="FAILED (exit $status${cause:+, $cause}${artifact:+, $artifact}; see $log)"
        echo "!! $t: $result" >&2
        tail -n 30 "$log" >&2
    fi
    echo "   $t: ${runs} runs in ${secs} s, ${rate} exec/s, stack $stack" >&2
    rows+=("| $t | $files | $largest | $max_len | $stack | $runs | $secs | $rate | ${rss:--} |"\
" $result |")
done

{
    rev=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
    compiler=$(rustc "${plus[@]}" -V 2>/dev/null || echo "$TOOLCHAIN")
    fuzzer=$(cargo fuzz --version 2>/dev/null || echo cargo-fuzz)
    env_shown="SECS=$SECS"
    [[ $SANITIZER == address ]] || env_shown+=" SANITIZER=$SANITIZER"
    echo "$(date -u +%F), \`$env_shown bash fuzz/run.sh${*:+ $*}\` at $rev, $compiler, $fuzzer," \
        "$sanitizer_name (--sanitizer $SANITIZER), $(nproc) cores, stack limit $STACK_KIB KiB" \
        "(ulimit -s):"
    echo
    echo "| target | corpus files | largest input (bytes) | -max_len | stack | runs | seconds |" \
        "exec/s | peak RSS MB | result |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    printf '%s\n' "${rows[@]}"
} | tee "$LOGS/table.md"
exit "$failed"
