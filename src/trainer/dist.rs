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
    /// Token counts, loss and eval sums, the interrupt flag: staged on the group's device
    /// ([`ProcessGroup::device`]: the rank's GPU under NCCL, which rejects CPU tensors; the CPU
    /// under Gloo) and read back to the host.
    fn all_reduce_f64(&mut self, values: &[f64]) -> Result<Vec<f64>> {
        let mut one = [Tensor::f_from_slice(values)
            .and_then(|t| t.f_to_kind(Kind::Double))
            .and_then(|t| t.f_to_device(self.pg.device()))
            .ctx("all_reduce values: stage on the backend's device")?];
        self.pg.all_reduce_sum(&mut one)?;
        let v: Vec<f64> = one[0]
            .f_to_device(tch::Device::Cpu)
            .ctx("all_reduce result: copy to the host")
            .and_then(|t| Vec::<f64>::try_from(&t).ctx("all_reduce result"))?;
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
            None => Err(crate::Error::Internal(
                "C10dCollective: average_grads before prepare_grads".into(),
            )),
        }
    }
    fn broadcast_params(&mut self, params: &[(String, Tensor)]) -> Result<()> {
        broadcast_params(&self.pg, params, 0)
    }
}
