//! [`Collective`] over c10d: a [`ProcessGroup`] plus a bucketed, backward-overlapped
//! [`GradSync`].

use tch::{Kind, Tensor};

use crate::dist::{GradSync, ProcessGroup, broadcast_params};
use crate::error::{Result, TchResultExt};
use crate::trainer::Collective;

/// Data-parallel collectives of one process of a c10d job.
pub struct C10dCollective {
    pg: ProcessGroup,
    bucket_mb: f64,
    sync: Option<GradSync>,
}

impl C10dCollective {
    /// Wraps a process group; gradients go in buckets of `bucket_mb` MB.
    pub fn new(pg: ProcessGroup, bucket_mb: f64) -> Self {
        C10dCollective {
            pg,
            bucket_mb,
            sync: None,
        }
    }

    /// The process group.
    pub fn process_group(&self) -> &ProcessGroup {
        &self.pg
    }
}

impl Collective for C10dCollective {
    fn rank(&self) -> usize {
        self.pg.rank()
    }
    fn world_size(&self) -> usize {
        self.pg.world_size()
    }
    fn all_reduce_f64(&mut self, values: &[f64]) -> Result<Vec<f64>> {
        let t = Tensor::f_from_slice(values).ctx("all_reduce values")?;
        let mut one = [t.f_to_kind(Kind::Double).ctx("to f64")?];
        self.pg.all_reduce_sum(&mut one)?;
        let v: Vec<f64> = Vec::<f64>::try_from(&one[0]).ctx("all_reduce result")?;
        Ok(v)
    }
    fn prepare_grads(&mut self, params: &[(String, Tensor)]) -> Result<()> {
        if self.sync.is_none() {
            self.sync = Some(GradSync::overlapped(&self.pg, params, self.bucket_mb)?);
        }
        Ok(())
    }
    fn sync_in_backward(&mut self, on: bool) {
        if let Some(s) = &self.sync {
            s.set_overlap(on);
        }
    }
    fn average_grads(&mut self) -> Result<()> {
        match &self.sync {
            Some(s) => s.sync(&self.pg),
            None => Err(crate::Error::invalid(
                "C10dCollective: average_grads before prepare_grads",
            )),
        }
    }
    fn broadcast_params(&mut self, params: &[(String, Tensor)]) -> Result<()> {
        broadcast_params(&self.pg, params, 0)
    }
}
