//! Scheduling: a job's priority class and when it may run (retry, window), and which job a
//! destination's class driver sends next (highest class first, then oldest).

use super::{Job, Outbox};
use crate::{Priority, TransferError, now_ms};

/// The driver classes, in rank order: one transfer of each runs at a time per destination.
pub const CLASSES: [&str; 4] = [
    Priority::Alarm.as_str(),
    Priority::Normal.as_str(),
    Priority::Bulk.as_str(),
    Priority::Backup.as_str(),
];

/// What a destination's class driver does next ([`Outbox::next_for`]).
#[derive(Debug)]
pub enum Next {
    Send(Box<Job>),
    /// Nothing to send now: wake at this time (a window opening, a retry due), or when a job
    /// for the destination changes ([`Outbox::waker`]).
    Wait(Option<i64>),
}

impl Job {
    /// The driver class that sends it: alarm, bulk, backup, or normal (anything else).
    pub fn class(&self) -> &'static str {
        self.priority.as_str()
    }

    /// When it may next be sent, not before `now`: `None` if never from here (finished, sent
    /// by a relay, or an empty window).
    fn runnable_at(&self, now: i64) -> Option<i64> {
        if self.via.is_some() || self.finished() {
            return None;
        }
        let from = self.retry_at_ms.max(now);
        match self.window {
            Some(w) => w.next_open(from),
            None => Some(from),
        }
    }
}

impl Outbox {
    /// The next job of `class` (see [`CLASSES`]) to send to `dest` now: the oldest runnable
    /// one; or, if none is, when one will be.
    pub fn next_for(&self, dest: &str, class: &str) -> Result<Next, TransferError> {
        self.next_for_except(dest, class, &[])
    }

    /// [`Outbox::next_for`], passing over the jobs in `running` (a driver's transfers under
    /// way).
    pub fn next_for_except(
        &self,
        dest: &str,
        class: &str,
        running: &[String],
    ) -> Result<Next, TransferError> {
        let now = now_ms();
        // A held class waits for its release (which wakes the drivers), looking again now
        // and then in case a release was missed.
        if self.held(Priority::class_of(class)).is_some() {
            return Ok(Next::Wait(Some(now + 30_000)));
        }
        let mut wake: Option<i64> = None;
        let mut best: Option<Job> = None;
        for j in self.scan(format!("j/{dest}/").as_bytes())? {
            if j.dest != dest || j.class() != class || running.contains(&j.id) {
                continue;
            }
            // `scan` returns jobs oldest first: the first runnable one is the one to send.
            match j.runnable_at(now) {
                Some(t) if t > now => wake = Some(wake.map_or(t, |w| w.min(t))),
                Some(_) if best.is_none() => best = Some(j),
                _ => {}
            }
        }
        Ok(match best {
            Some(j) => Next::Send(Box::new(j)),
            None => Next::Wait(wake),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Manifest;
    use crate::outbox::JobState;

    #[test]
    fn next_job_is_highest_priority_then_oldest() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let ob = Outbox::new(db.open_tree("o").unwrap());
        let m = Manifest {
            name: "f".into(),
            size: 1,
            chunk_size: crate::manifest::MIN_CHUNK,
            file_hash: [0; 32],
            chunks: vec![[0; 32]],
        };
        let mut a = Job::new("a", "s1", "/x".into(), m.clone());
        a.priority = Priority::Bulk;
        a.created_ms = 1;
        let mut b = Job::new("b", "s1", "/x".into(), m.clone());
        b.created_ms = 2;
        let mut c = Job::new("c", "s1", "/x".into(), m.clone());
        c.priority = Priority::Alarm;
        c.created_ms = 3;
        let mut d = Job::new("d", "s2", "/x".into(), m.clone());
        d.priority = Priority::Alarm;
        let mut e = Job::new("e", "s1", "/x".into(), m);
        e.priority = Priority::Alarm;
        e.state = JobState::Delivered;
        for j in [&a, &b, &c, &d, &e] {
            ob.enqueue((*j).clone()).unwrap();
        }
        let next = |class| match ob.next_for("s1", class).unwrap() {
            Next::Send(j) => Ok(j.id),
            Next::Wait(at) => Err(at),
        };
        // Each class has its own driver: an alarm job does not hold back the others.
        assert_eq!(next("alarm"), Ok("c".to_string()));
        assert_eq!(next("normal"), Ok("b".to_string()));
        assert_eq!(next("bulk"), Ok("a".to_string()));
        // A held class sends nothing (a rain fade holds backups); the others go on.
        assert!(ob.hold(Priority::Bulk, Some("rain fade".into())));
        assert!(
            !ob.hold(Priority::Bulk, Some("rain fade".into())),
            "no change"
        );
        assert!(matches!(next("bulk"), Err(Some(_))));
        assert_eq!(next("normal"), Ok("b".to_string()));
        assert!(ob.hold(Priority::Bulk, None));
        assert_eq!(ob.held(Priority::Bulk), None);
        assert_eq!(next("bulk"), Ok("a".to_string()));
        c.state = JobState::Failed;
        ob.put(&c).unwrap();
        assert_eq!(next("alarm"), Err(None));
        // A retry later: the driver is told when to look again.
        b.retry_at_ms = now_ms() + 60_000;
        ob.put(&b).unwrap();
        assert_eq!(next("normal"), Err(Some(b.retry_at_ms)));
        let mut f = Job::new("f", "s1", "/x".into(), b.manifest.clone());
        f.created_ms = 9;
        ob.enqueue(f).unwrap();
        assert_eq!(next("normal"), Ok("f".to_string()));
        assert!(matches!(
            ob.next_for("nowhere", "normal").unwrap(),
            Next::Wait(None)
        ));
    }
}
