// The guest program KvmGuest runs on every vCPU: walk a table of pages and
// touch each one from the guest, so that any fault on the host side comes
// from KVM itself (as under Firecracker), not from a host thread.
//
// It runs in 32-bit protected mode with flat 4 GiB segments and paging off
// (KvmGuest sets CR0.PE and the segment caches through KVM_SET_SREGS; no GDT
// is ever loaded because no segment register is ever reloaded), so a linear
// address is a guest-physical address and every GPA below 4 GiB is reachable.
//
// The code is position independent (no absolute jumps or data references):
// the host copies the bytes between guest_touch_start and guest_touch_end to
// a code page of its choosing. Its inputs arrive in registers (set with
// KVM_SET_REGS before each KVM_RUN):
//   esi  table of entries, 16 bytes each:
//          +0  u32 GPA of the first qword of the page (the touched address)
//          +4  u32 GPA of the last qword of the page
//          +8  u64 page offset into the guest's memory (what a write stores)
//   ecx  number of entries (may be 0)
//   edi  output table, 16 bytes per entry (only for reads):
//          +0 u64 first qword as read, +8 u64 last qword as read
//   ebx  bit 0: read the page first, bit 1: write the page
//   ebp  header: +0 u64 write tag, +8 u32 entries completed (the guest
//        increments it after each entry, so the host can tell how far the
//        program got if it stops early)
// When the table is done the guest OUTs to the done port (kept in sync with
// kDonePort in kvm_guest.cc) and halts; the host stops at the OUT.
//
// Qwords are read and written as two dwords: nothing else writes these pages
// while a vCPU touches them, and the emulator that runs guest kernel code on
// kvm_pvm need not support SSE/MMX for a single 8-byte move.

  .section .rodata
  .globl guest_touch_start
  .globl guest_touch_end
  .code32
guest_touch_start:
  test %ecx, %ecx
  jz .Ldone
.Lnext_entry:
  test $1, %bl
  jz .Lwrite
  mov (%esi), %edx
  mov (%edx), %eax
  mov %eax, (%edi)
  mov 4(%edx), %eax
  mov %eax, 4(%edi)
  mov 4(%esi), %edx
  mov (%edx), %eax
  mov %eax, 8(%edi)
  mov 4(%edx), %eax
  mov %eax, 12(%edi)
  add $16, %edi
.Lwrite:
  test $2, %bl
  jz .Ladvance
  mov (%esi), %edx
  mov (%ebp), %eax
  mov %eax, (%edx)
  mov 4(%ebp), %eax
  mov %eax, 4(%edx)
  mov 8(%esi), %eax
  mov %eax, 8(%edx)
  mov 12(%esi), %eax
  mov %eax, 12(%edx)
.Ladvance:
  add $16, %esi
  incl 8(%ebp)
  dec %ecx
  jnz .Lnext_entry
.Ldone:
  mov $0x3f0, %dx
  out %al, %dx
  hlt
  jmp .Ldone
guest_touch_end:
  .code64

  .section .note.GNU-stack,"",@progbits
