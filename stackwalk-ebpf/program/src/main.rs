//! unwound's in-kernel stack walker.
//!
//! Attached to a `cpu-clock` software perf event on every online CPU. For each sample of a
//! selected task it takes the kernel stack, the task's *user* registers (from the task's
//! saved `pt_regs` when the sample interrupted it in kernel mode) and walks the user stack
//! by frame pointers in a bounded `bpf_loop`, then copies one variable-length record to a
//! ring buffer.
//!
//! Why a ring buffer of samples rather than counts aggregated in a map: a map keyed by
//! stack needs a fixed, preallocated worst case of distinct stacks and loses samples (or
//! wipes state) when it fills; a ring buffer only loses samples while userspace is behind,
//! each loss is counted, and records carry the pid, thread, CPU and time. Records are only
//! as long as the stack they carry (`bpf_ringbuf_output` with the used length), so a
//! 20-frame sample costs ~210 bytes, not the 3 KiB capacity. At 99 Hz per CPU that is a
//! few tens of KiB per second per CPU for the agent to fold.
//!
//! The record layout, the counters and the configuration live in `unwound-stackwalk-abi`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{
        bpf_get_current_comm, bpf_get_current_task_btf, bpf_get_smp_processor_id, bpf_get_stack,
        bpf_ktime_get_ns, bpf_loop, bpf_probe_read_kernel, bpf_probe_read_user, bpf_task_pt_regs,
    },
    macros::{map, perf_event},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::PerfEventContext,
    EbpfContext,
};
use unwound_stackwalk_abi::{
    Counter, SampleBuffer, WalkerConfig, COUNTER_SLOTS, FLAG_IN_KERNEL, FLAG_KERNEL_STACK_FAILED,
    FLAG_NO_USER, FLAG_USER_TRUNCATED, FLAG_USER_WALK_FAILED, HEADER_SIZE, MAX_FRAMES, MAX_KERNEL_FRAMES,
    MAX_PIDS, MAX_USER_FRAMES,
};

/// 4 MiB: at 99 Hz on 64 CPUs with 40-frame stacks that is ~2 s of samples; the agent
/// drains it every 100 ms.
#[map]
static SAMPLES: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map]
static CONFIG: Array<WalkerConfig> = Array::with_max_entries(1, 0);

#[map]
static PIDS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_PIDS, 0);

#[map]
static SCRATCH: PerCpuArray<SampleBuffer> = PerCpuArray::with_max_entries(1, 0);

const RECORD_CAPACITY: usize = HEADER_SIZE + MAX_FRAMES * 8;

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot; perf-event programs do not nest on one CPU.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn is_user_mode(regs: &pt_regs) -> bool {
    regs.cs & 3 == 3
}

/// The interrupted task's user (rip, rsp, rbp), and whether the sample hit kernel mode.
#[inline(always)]
unsafe fn user_registers(ctx: &PerfEventContext) -> (Option<(u64, u64, u64)>, bool) {
    let regs = &(*ctx.ctx).regs;
    if is_user_mode(regs) {
        return (Some((regs.rip, regs.rsp, regs.rbp)), false);
    }
    let task = bpf_get_current_task_btf();
    if task.is_null() {
        return (None, true);
    }
    let saved = bpf_task_pt_regs(task) as *const pt_regs;
    if saved.is_null() {
        return (None, true);
    }
    match bpf_probe_read_kernel(saved) {
        // A kernel thread's saved frame is not a user-mode frame.
        Ok(r) if is_user_mode(&r) && r.rip != 0 => (Some((r.rip, r.rsp, r.rbp)), true),
        _ => (None, true),
    }
}

/// One frame-pointer step, called by `bpf_loop`. Returns 1 to stop.
unsafe extern "C" fn frame_pointer_step(_index: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(buf) = SCRATCH.get_ptr_mut(0) else { return 1 };
    let buf = &mut *buf;
    let fp = buf.walk_fp;
    if fp == 0 {
        return 1;
    }
    if buf.walk_budget == 0 {
        buf.header.flags |= FLAG_USER_TRUNCATED;
        return 1;
    }
    if fp & 7 != 0 {
        buf.header.flags |= FLAG_USER_WALK_FAILED;
        return 1;
    }
    // [fp] = caller's frame pointer, [fp + 8] = return address.
    let Ok(record) = bpf_probe_read_user(fp as *const [u64; 2]) else {
        buf.header.flags |= FLAG_USER_WALK_FAILED;
        return 1;
    };
    let (next, ret) = (record[0], record[1]);
    if ret == 0 {
        return 1;
    }
    let index = buf.walk_index as usize;
    if index >= MAX_FRAMES {
        buf.header.flags |= FLAG_USER_TRUNCATED;
        return 1;
    }
    buf.frames[index] = ret;
    buf.walk_index += 1;
    buf.walk_budget -= 1;
    buf.header.user_len += 1;
    if next == 0 {
        return 1;
    }
    // Frames live at higher addresses than their callees; anything else is not a chain.
    if next <= fp {
        buf.header.flags |= FLAG_USER_WALK_FAILED;
        return 1;
    }
    buf.walk_fp = next;
    0
}

#[perf_event]
pub fn on_cpu_sample(ctx: PerfEventContext) -> u32 {
    unsafe { sample(&ctx) };
    0
}

#[inline(always)]
unsafe fn sample(ctx: &PerfEventContext) {
    count(Counter::Samples);
    let pid = ctx.tgid();
    if pid == 0 {
        count(Counter::Idle);
        return;
    }
    let Some(config) = CONFIG.get(0) else {
        count(Counter::DroppedNoScratch);
        return;
    };
    if config.filter_pids != 0 && PIDS.get_ptr(pid).is_none() {
        count(Counter::Filtered);
        return;
    }
    let max_user = config.max_user_frames;
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        count(Counter::DroppedNoScratch);
        return;
    };
    let buf = &mut *buf;
    buf.header.pid = pid;
    buf.header.tid = ctx.pid();
    buf.header.cpu = bpf_get_smp_processor_id();
    buf.header.time_ns = bpf_ktime_get_ns();
    buf.header.flags = 0;
    buf.header.kernel_len = 0;
    buf.header.user_len = 0;
    buf.header.reserved = 0;
    buf.header.comm = bpf_get_current_comm().unwrap_or([0; 16]);

    let copied = bpf_get_stack(
        ctx.as_ptr(),
        buf.frames.as_mut_ptr() as *mut core::ffi::c_void,
        (MAX_KERNEL_FRAMES * 8) as u32,
        0,
    );
    let mut kernel_len = 0usize;
    if copied < 0 {
        buf.header.flags |= FLAG_KERNEL_STACK_FAILED;
        count(Counter::KernelStackFailed);
    } else {
        kernel_len = (copied as usize) / 8;
        if kernel_len > MAX_KERNEL_FRAMES {
            kernel_len = MAX_KERNEL_FRAMES;
        }
    }
    buf.header.kernel_len = kernel_len as u16;

    let (user, in_kernel) = user_registers(ctx);
    if in_kernel {
        buf.header.flags |= FLAG_IN_KERNEL;
    }
    match user {
        None => {
            buf.header.flags |= FLAG_NO_USER;
            count(Counter::KernelThread);
        }
        Some((ip, _sp, bp)) => {
            if kernel_len < MAX_FRAMES {
                buf.frames[kernel_len] = ip;
                buf.header.user_len = 1;
            }
            let budget = if max_user as usize > MAX_USER_FRAMES { MAX_USER_FRAMES as u32 } else { max_user };
            buf.walk_fp = bp;
            buf.walk_index = kernel_len as u32 + 1;
            buf.walk_budget = budget.saturating_sub(1);
            bpf_loop(budget + 1, frame_pointer_step as *mut core::ffi::c_void, core::ptr::null_mut(), 0);
            if buf.header.flags & FLAG_USER_TRUNCATED != 0 {
                count(Counter::UserTruncated);
            }
            if buf.header.flags & FLAG_USER_WALK_FAILED != 0 {
                count(Counter::UserWalkFailed);
            }
        }
    }

    let frames = buf.header.kernel_len as usize + buf.header.user_len as usize;
    let mut len = HEADER_SIZE + frames * 8;
    if len > RECORD_CAPACITY {
        len = RECORD_CAPACITY;
    }
    let bytes = core::slice::from_raw_parts(buf as *const SampleBuffer as *const u8, len);
    match SAMPLES.output::<[u8]>(bytes, 0) {
        Ok(()) => count(Counter::Emitted),
        Err(_) => count(Counter::DroppedRingFull),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
