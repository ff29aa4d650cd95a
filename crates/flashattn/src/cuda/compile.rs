//! Run-time compilation of the embedded CUDA sources with NVRTC, to a cubin for the GPU's exact architecture,
//! cached on disk so that a second run starts at once.
//!
//! A unit's `#include`s are NVRTC named headers: given with the source, never read from disk. The cache key hashes
//! the source, every header given (name and text), the options, the architecture and the NVRTC version; entries
//! live in `$XDG_CACHE_HOME/flashattn/kernels` (or `~/.cache/flashattn/kernels`; `FLASHATTN_CACHE_DIR`
//! overrides).

use crate::error::{AttnError, Result};
use cudarc::nvrtc::sys as nv;
use std::borrow::Cow;
use std::ffi::{CStr, CString};
use std::path::PathBuf;

/// A translation unit: the main source and the headers it may `#include`, by the names it includes them by.
pub struct Source {
    pub main: &'static str,
    pub headers: Vec<(&'static str, Cow<'static, str>)>,
}

/// A compiled kernel image and what ptxas reported about it.
pub struct Compiled {
    pub cubin: Vec<u8>,
    /// The compiler log (ptxas resource usage when compiled with `verbose`).
    pub log: String,
    /// Whether it came from the disk cache.
    pub cached: bool,
}

/// Whether the NVRTC library can be loaded.
pub fn nvrtc_present() -> bool {
    #[cfg(feature = "dynamic-loading")]
    // SAFETY: only probes whether the shared library opens.
    return unsafe { nv::is_culib_present() };
    #[cfg(not(feature = "dynamic-loading"))]
    super::gpu::library_present(&[
        "libnvrtc.so.13",
        "libnvrtc.so.12",
        "libnvrtc.so",
        "nvrtc64_130_0.dll",
        "nvrtc64_120_0.dll",
    ])
}

/// The NVRTC version, (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_present() {
        return Err(AttnError::Cuda("NVRTC (libnvrtc) was not found: install the CUDA toolkit's NVRTC or the nvidia-cuda-nvrtc wheel and put its lib folder on the library path".into()));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; the out-pointers are valid.
    let r = unsafe { nv::nvrtcVersion(&mut major, &mut minor) };
    check(r, "nvrtcVersion")?;
    Ok((major, minor))
}

fn check(r: nv::nvrtcResult, what: &str) -> Result<()> {
    if r == nv::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(AttnError::Cuda(format!("{what} failed: {r:?}")))
    }
}

/// FNV-1a, 64 bits: a stable hash for cache keys.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for &b in part.iter().chain(&[0xff]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The cache key of a compilation: everything NVRTC is given, headers included.
fn cache_key(source: &Source, opts: &[String], nvrtc: &str) -> u64 {
    let opts = opts.join(" ");
    let mut parts = vec![source.main.as_bytes(), opts.as_bytes(), nvrtc.as_bytes()];
    parts.extend(source.headers.iter().flat_map(|(name, text)| [name.as_bytes(), text.as_bytes()]));
    fnv1a(&parts)
}

/// The folder of cached kernels.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("FLASHATTN_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("flashattn").join("kernels"))
}

/// Compiles `source` for `arch` (e.g. "sm_90") with `options`, or reads it from the cache. With `verbose`,
/// ptxas reports registers, spills and stack in the log (and the cache is bypassed, since logs are not cached).
pub fn compile(name: &str, source: &Source, arch: &str, options: &[String], verbose: bool) -> Result<Compiled> {
    let (major, minor) = nvrtc_version()?;
    let mut opts = vec![format!("--gpu-architecture={arch}"), "-std=c++17".to_string(), "-lineinfo".to_string()];
    opts.extend(options.iter().cloned());
    if verbose {
        opts.push("--ptxas-options=-v".into());
    }
    let key = cache_key(source, &opts, &format!("nvrtc {major}.{minor}"));
    let path = cache_dir().map(|d| d.join(format!("{name}-{arch}-{key:016x}.cubin")));
    if !verbose {
        if let Some(cubin) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
            return Ok(Compiled { cubin, log: String::new(), cached: true });
        }
    }
    let (cubin, log) = nvrtc(name, source, &opts)?;
    if let Some(path) = path {
        // Best effort: a read-only or full disk only costs the next run a compile.
        if std::fs::create_dir_all(path.parent().unwrap()).is_ok() {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, &cubin).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
    }
    Ok(Compiled { cubin, log, cached: false })
}

fn c_string(text: &str) -> Result<CString> {
    CString::new(text).map_err(|_| AttnError::Cuda("kernel source contains a NUL byte".into()))
}

fn nvrtc(name: &str, source: &Source, opts: &[String]) -> Result<(Vec<u8>, String)> {
    let src = c_string(source.main)?;
    let cname = CString::new(name).unwrap();
    let headers = source.headers.iter().map(|(_, text)| c_string(text)).collect::<Result<Vec<_>>>()?;
    let includes = source.headers.iter().map(|(name, _)| c_string(name)).collect::<Result<Vec<_>>>()?;
    let header_ptrs: Vec<*const std::ffi::c_char> = headers.iter().map(|c| c.as_ptr()).collect();
    let include_ptrs: Vec<*const std::ffi::c_char> = includes.iter().map(|c| c.as_ptr()).collect();
    let copts: Vec<CString> = opts.iter().map(|o| CString::new(o.as_str()).unwrap()).collect();
    let ptrs: Vec<*const std::ffi::c_char> = copts.iter().map(|c| c.as_ptr()).collect();
    let mut prog: nv::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the duration of the calls; the program is destroyed at the end.
    unsafe {
        check(
            nv::nvrtcCreateProgram(
                &mut prog,
                src.as_ptr(),
                cname.as_ptr(),
                header_ptrs.len() as i32,
                header_ptrs.as_ptr(),
                include_ptrs.as_ptr(),
            ),
            "nvrtcCreateProgram",
        )?;
        let compiled = nv::nvrtcCompileProgram(prog, ptrs.len() as i32, ptrs.as_ptr());
        let log = program_log(prog);
        let result = if compiled != nv::nvrtcResult::NVRTC_SUCCESS {
            Err(AttnError::Cuda(format!("compiling {name} ({}) failed:\n{log}", opts.join(" "))))
        } else {
            let mut size = 0usize;
            check(nv::nvrtcGetCUBINSize(prog, &mut size), "nvrtcGetCUBINSize").and_then(|_| {
                let mut cubin = vec![0u8; size];
                check(nv::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _), "nvrtcGetCUBIN").map(|_| (cubin, log))
            })
        };
        nv::nvrtcDestroyProgram(&mut prog);
        result
    }
}

unsafe fn program_log(prog: nv::nvrtcProgram) -> String {
    let mut size = 0usize;
    unsafe {
        if nv::nvrtcGetProgramLogSize(prog, &mut size) != nv::nvrtcResult::NVRTC_SUCCESS || size == 0 {
            return String::new();
        }
        let mut buf = vec![0u8; size];
        if nv::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut _) != nv::nvrtcResult::NVRTC_SUCCESS {
            return String::new();
        }
        CStr::from_bytes_until_nul(&buf).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

/// Per-kernel resource usage parsed from a verbose ptxas log.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    pub function: String,
    pub registers: u32,
    pub stack_bytes: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub shared_bytes: u32,
    /// ptxas' notes naming this function that cost speed: "Potential Performance Loss" (serialized wgmma, ignored
    /// setmaxnreg) and waits it injected ("warpgroup.wait is injected").
    pub warnings: Vec<String>,
}

/// Parses ptxas' "Compiling entry function", "N bytes stack frame, N bytes spill stores, N bytes spill loads"
/// and "Used N registers" lines, and the performance warnings that name a function.
pub fn parse_resources(log: &str) -> Vec<Resources> {
    let mut out: Vec<Resources> = Vec::new();
    let number_before = |line: &str, word: &str| -> Option<u32> {
        let idx = line.find(word)?;
        line[..idx].split(|c: char| !c.is_ascii_digit()).rev().find(|s| !s.is_empty())?.parse().ok()
    };
    let mut warnings = Vec::new();
    for line in log.lines() {
        if line.contains("Performance Loss") || line.contains("is injected") {
            warnings.push(line.trim().to_string());
        } else if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            out.push(Resources { function: rest.split('\'').next().unwrap_or("").to_string(), ..Default::default() });
        } else if let Some(r) = out.last_mut() {
            if line.contains("stack frame") {
                r.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                r.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                r.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                r.registers = number_before(line, "registers").unwrap_or(0);
                r.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    for r in &mut out {
        r.warnings = warnings.iter().filter(|w| w.contains(&format!("'{}'", r.function))).cloned().collect();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_reports() {
        let log = "ptxas info    : 0 bytes gmem\nptxas info    : Compiling entry function 'flash_fwd' for 'sm_90'\nptxas info    : Function properties for flash_fwd\n    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\nptxas info    : Used 255 registers, used 1 barriers, 384 bytes cmem[0]\n";
        let r = parse_resources(log);
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].function.as_str(), r[0].registers, r[0].stack_bytes, r[0].spill_stores, r[0].spill_loads),
            ("flash_fwd", 255, 8, 4, 12)
        );
        assert!(r[0].warnings.is_empty());
    }

    #[test]
    fn keeps_performance_warnings() {
        let log = "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient register resources for the wgmma pipeline in the function 'flash_fwd_sm90'\nptxas info    : Compiling entry function 'flash_fwd_sm90' for 'sm_90a'\nptxas info    : Used 168 registers\n";
        let r = parse_resources(log);
        assert_eq!(r[0].warnings.len(), 1);
        assert!(r[0].warnings[0].contains("serialized"));
    }

    #[test]
    fn hashes_are_stable_and_distinct() {
        assert_eq!(fnv1a(&[b"a"]), fnv1a(&[b"a"]));
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }

    #[test]
    fn cache_keys_hash_the_headers() {
        let source = |text: &'static str| Source { main: "#include \"a.cuh\"", headers: vec![("a.cuh", text.into())] };
        let key = |s: &Source| cache_key(s, &["-DX=1".into()], "nvrtc 13.0");
        assert_eq!(key(&source("int a;")), key(&source("int a;")));
        assert_ne!(key(&source("int a;")), key(&source("int b;")));
    }
}
