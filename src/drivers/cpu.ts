/**
 * What the workstation's CPU does fast, for choices made once per repository (`init`'s id function,
 * cli/init.ts). HMAC-SHA256 is the fastest on CPUs with SHA instructions (x86 SHA-NI, the ARMv8 SHA2
 * extension: well over 1 GB/s); without them HMAC-BLAKE2b is about 1.8 times as fast as HMAC-SHA256
 * (the benchmark's machine, an Intel Xeon without SHA-NI: 620 against 337 MB/s, 1 MiB messages).
 * Linux tells through /proc/cpuinfo; elsewhere the answer is no.
 */
import fs from 'node:fs';

/** Whether /proc/cpuinfo's text names SHA-256 instructions (x86 "flags ... sha_ni", arm64 "Features ... sha2"). */
export function cpuinfoHasSha256(cpuinfo: string): boolean {
  return /^(flags|Features)\s*:.*\b(sha_ni|sha2)\b/m.test(cpuinfo);
}

/** Whether this machine's CPU has SHA-256 instructions (false where /proc/cpuinfo cannot be read). */
export function hasSha256Instructions(cpuinfoPath = '/proc/cpuinfo'): boolean {
  try {
    return cpuinfoHasSha256(fs.readFileSync(cpuinfoPath, 'latin1'));
  } catch {
    return false;
  }
}
