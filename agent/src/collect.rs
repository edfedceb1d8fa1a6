//! Host health from sysinfo: CPU, load, memory, filesystems, interfaces, uptime.

use sysinfo::{Disks, Networks, System};
use tiandi_proto::{Filesystem, Host, Interface};

/// Pseudo filesystems that say nothing about a site's disks.
const SKIP_FS: &[&str] = &[
    "tmpfs",
    "devtmpfs",
    "overlay",
    "squashfs",
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "nsfs",
    "ramfs",
    "autofs",
    "fuse.lxcfs",
];
const MAX_ITEMS: usize = 16;

pub struct HostCollector {
    sys: System,
    disks: Disks,
    nets: Networks,
    ignore_mounts: Vec<String>,
    ignore_interfaces: Vec<String>,
}

impl HostCollector {
    pub fn new(
        ignore_mounts: Vec<String>,
        ignore_interfaces: Vec<String>,
    ) -> Result<HostCollector, String> {
        let mut sys = System::new().map_err(|e| format!("sysinfo: {e}"))?;
        // The first CPU reading is always 0: take one now, the next sample measures from here.
        sys.refresh_cpu_usage();
        sys.refresh_memory();
        Ok(HostCollector {
            sys,
            disks: Disks::new_with_refreshed_list().map_err(|e| format!("sysinfo disks: {e}"))?,
            nets: Networks::new_with_refreshed_list()
                .map_err(|e| format!("sysinfo networks: {e}"))?,
            ignore_mounts,
            ignore_interfaces,
        })
    }

    pub fn sample(&mut self) -> Host {
        self.sys.refresh_cpu_usage();
        self.sys.refresh_memory();
        self.disks.refresh(true);
        self.nets.refresh(true);
        let load = System::load_average().unwrap_or(sysinfo::LoadAvg {
            one: 0.0,
            five: 0.0,
            fifteen: 0.0,
        });
        let mib = |b: u64| b / (1024 * 1024);
        let mut filesystems: Vec<Filesystem> = Vec::new();
        for d in self.disks.iter() {
            let fs = d.file_system().to_string_lossy();
            let mount = d.mount_point().to_string_lossy().into_owned();
            if SKIP_FS.contains(&fs.as_ref())
                || self.ignore_mounts.contains(&mount)
                || d.total_space() == 0
                || filesystems.iter().any(|f| f.mount == mount)
            {
                continue;
            }
            filesystems.push(Filesystem {
                mount,
                used_mib: mib(d.total_space().saturating_sub(d.available_space())),
                total_mib: mib(d.total_space()),
                ..Default::default()
            });
        }
        filesystems.sort_by(|a, b| a.mount.cmp(&b.mount));
        filesystems.truncate(MAX_ITEMS);
        let mut interfaces: Vec<Interface> = self
            .nets
            .iter()
            .map(|(name, n)| (name.to_string_lossy().into_owned(), n))
            .filter(|(name, _)| !self.ignore_interfaces.iter().any(|i| i == name))
            .map(|(name, n)| Interface {
                name,
                rx_bytes: n.total_received(),
                tx_bytes: n.total_transmitted(),
                rx_errors: n.total_errors_on_received(),
                tx_errors: n.total_errors_on_transmitted(),
                ..Default::default()
            })
            .collect();
        interfaces.sort_by(|a, b| a.name.cmp(&b.name));
        interfaces.truncate(MAX_ITEMS);
        Host {
            cpu_permille: (self.sys.global_cpu_usage() * 10.0)
                .round()
                .clamp(0.0, 1000.0) as u32,
            load1_c: (load.one * 100.0) as u32,
            load5_c: (load.five * 100.0) as u32,
            load15_c: (load.fifteen * 100.0) as u32,
            mem_used_mib: mib(self.sys.used_memory()),
            mem_total_mib: mib(self.sys.total_memory()),
            uptime_s: System::uptime().unwrap_or(0),
            filesystems,
            interfaces,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_host() {
        let mut c = HostCollector::new(vec![], vec!["lo".into()]).unwrap();
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let h = c.sample();
        assert!(h.mem_total_mib > 0 && h.mem_used_mib <= h.mem_total_mib);
        assert!(h.uptime_s > 0);
        assert!(!h.filesystems.is_empty(), "no filesystem found");
        assert!(h.filesystems.iter().all(|f| f.used_mib <= f.total_mib));
        assert!(h.interfaces.iter().all(|i| i.name != "lo"));
    }
}
