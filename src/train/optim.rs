//! AdamW with PyTorch's semantics, global-norm clipping, and the named-parameter plumbing that
//! checkpoints need.
//!
//! Burn's optimizers clip each tensor by its own norm and key their state by random
//! `ParamId`s, which a resumed process does not reproduce. Here the state is keyed by the
//! parameter's module path (`layers.0.self_attn.q_proj.lora.a`), so it saves to safetensors and
//! loads back into a freshly built model exactly.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::TensorData;
use kiln_kernels::{AdamWOp, AdamWStep};

/// AdamW hyper-parameters (PyTorch's `torch.optim.AdamW` formulas).
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// First and second moments per parameter path, flattened.
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    /// Updates applied so far (PyTorch's `step`, for bias correction).
    pub step: usize,
    pub moments: HashMap<String, (Tensor<B, 1>, Tensor<B, 1>)>,
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self { config, step: 0, moments: HashMap::new() }
    }
}

impl<B: AdamWOp> AdamW<B> {
    /// Applies one update to every parameter of `module` that has a gradient in `grads`,
    /// with the gradient multiplied by `grad_scale` (clipping) first.
    pub fn update<AB, M>(&mut self, module: M, grads: &mut GradientsParams, lr: f64, grad_scale: f64) -> M
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: Module<AB>,
    {
        self.step += 1;
        let c = self.config;
        let step = AdamWStep { lr, beta1: c.beta1, beta2: c.beta2, eps: c.eps, weight_decay: c.weight_decay, grad_scale, t: self.step as i32 };
        let mut mapper = Update::<AB> { path: Vec::new(), grads, opt: self, step, scalars: None };
        module.map(&mut mapper)
    }
}

struct Update<'a, AB: AutodiffBackend> {
    path: Vec<String>,
    grads: &'a mut GradientsParams,
    opt: &'a mut AdamW<AB::InnerBackend>,
    step: AdamWStep,
    /// `step`'s scalars on the device, made with the first gradient.
    scalars: Option<Tensor<AB::InnerBackend, 1>>,
}

impl<AB: AutodiffBackend<InnerBackend: AdamWOp>> ModuleMapper<AB> for Update<'_, AB> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<AB::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let require_grad = tensor.is_require_grad();
        let shape = grad.shape();
        let n = shape.num_elements();
        let grad = grad.reshape([n]);
        let device = grad.device();
        let (m, v) = self
            .opt
            .moments
            .remove(&self.path.join("."))
            .unwrap_or_else(|| (Tensor::zeros([n], &device), Tensor::zeros([n], &device)));
        let scalars = self.scalars.get_or_insert_with(|| self.step.to_device(&device)).clone();
        let (p, m, v) = kiln_kernels::adamw(tensor.inner().reshape([n]), grad, m, v, &self.step, scalars);
        let p = p.reshape(shape);
        self.opt.moments.insert(self.path.join("."), (m, v));
        let mut tensor = Tensor::from_inner(p);
        if require_grad {
            tensor = tensor.require_grad();
        }
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// The L2 norm of all gradients together (what `torch.nn.utils.clip_grad_norm_` returns).
pub fn global_grad_norm<AB: AutodiffBackend, M: Module<AB>>(module: &M, grads: &GradientsParams) -> f64 {
    grad_square_sum(module, grads).map_or(0.0, |s| s.into_scalar().elem::<f64>().sqrt())
}

/// The sum of every gradient's squares, on the device (queued, not read): `None` without
/// gradients.
pub fn grad_square_sum<AB: AutodiffBackend, M: Module<AB>>(module: &M, grads: &GradientsParams) -> Option<Tensor<AB::InnerBackend, 1>> {
    struct Norm<'a, B: AutodiffBackend> {
        grads: &'a GradientsParams,
        sum: Option<Tensor<B::InnerBackend, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Norm<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                let s = g.powi_scalar(2).sum();
                self.sum = Some(match self.sum.take() {
                    Some(acc) => acc + s,
                    None => s,
                });
            }
        }
    }
    let mut v = Norm::<AB> { grads, sum: None };
    module.visit(&mut v);
    v.sum
}

/// Adds `other`'s gradients into `acc` (gradient accumulation across micro-batches).
pub fn accumulate<AB: AutodiffBackend, M: Module<AB>>(module: &M, acc: &mut GradientsParams, mut other: GradientsParams) {
    struct Acc<'a, B: AutodiffBackend> {
        acc: &'a mut GradientsParams,
        other: &'a mut GradientsParams,
        _b: std::marker::PhantomData<B>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Acc<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.other.remove::<B::InnerBackend, D>(param.id) {
                let sum = match self.acc.remove::<B::InnerBackend, D>(param.id) {
                    Some(a) => a + g,
                    None => g,
                };
                self.acc.register::<B::InnerBackend, D>(param.id, sum);
            }
        }
    }
    let mut v = Acc::<AB> { acc, other: &mut other, _b: Default::default() };
    module.visit(&mut v);
}

/// Trainable parameters (those that take gradients) by module path, as host data.
pub fn trainable_tensors<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    struct Collect {
        path: Vec<String>,
        out: Vec<(String, Vec<usize>, Vec<f32>)>,
    }
    impl<B: Backend> ModuleVisitor<B> for Collect {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if param.is_require_grad() {
                let t = param.val();
                let shape = t.dims().to_vec();
                let data = t.into_data().convert::<f32>().into_vec().unwrap_or_default();
                self.out.push((self.path.join("."), shape, data));
            }
        }
    }
    let mut c = Collect { path: Vec::new(), out: Vec::new() };
    module.visit(&mut c);
    c.out
}

/// Number of elements in trainable and in all parameters.
pub fn param_counts<B: Backend, M: Module<B>>(module: &M) -> (usize, usize) {
    struct Count(usize, usize);
    impl<B: Backend> ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let n = param.shape().num_elements();
            self.1 += n;
            if param.is_require_grad() {
                self.0 += n;
            }
        }
    }
    let mut c = Count(0, 0);
    module.visit(&mut c);
    (c.0, c.1)
}

/// Replaces parameters whose path is in `values` (checkpoint restore); returns how many.
pub fn load_named<B: Backend, M: Module<B>>(module: M, values: &HashMap<String, Vec<f32>>, device: &B::Device) -> (M, usize) {
    struct Load<'a, B: Backend> {
        path: Vec<String>,
        values: &'a HashMap<String, Vec<f32>>,
        device: &'a B::Device,
        loaded: usize,
    }
    impl<B: Backend> ModuleMapper<B> for Load<'_, B> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let Some(v) = self.values.get(&self.path.join(".")) else {
                return Param::from_mapped_value(id, tensor, mapper);
            };
            let require_grad = tensor.is_require_grad();
            let shape = tensor.shape();
            let mut t = Tensor::<B, D>::from_data(TensorData::new(v.clone(), shape), self.device);
            if require_grad {
                t = t.require_grad();
            }
            self.loaded += 1;
            Param::from_mapped_value(id, t, mapper)
        }
    }
    let mut l = Load { path: Vec::new(), values, device, loaded: 0 };
    let module = module.map(&mut l);
    let n = l.loaded;
    (module, n)
}

