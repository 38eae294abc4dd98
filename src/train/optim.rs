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

/// Where each parameter lives in the optimizer's flat buffers.
#[derive(Debug, Clone, PartialEq)]
struct Segment {
    path: String,
    offset: usize,
    len: usize,
}

/// Segments start at multiples of this many elements (512 bytes of f32, CUDA's allocation
/// alignment), so a parameter cut out of the updated buffer is a view, not a copy.
const SEGMENT_ALIGN: usize = 128;

/// The moments of the parameters that took part in the last update, end to end, and the
/// parameters themselves as that update left them (the module's tensors are cuts of `p`).
struct Flat<B: Backend> {
    segments: Vec<Segment>,
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
    p: Option<Tensor<B, 1>>,
}

impl<B: Backend> Clone for Flat<B> {
    fn clone(&self) -> Self {
        Self { segments: self.segments.clone(), m: self.m.clone(), v: self.v.clone(), p: self.p.clone() }
    }
}

impl<B: Backend> Flat<B> {
    /// Each parameter's moments, cut out of the buffers.
    fn by_path(&self) -> impl Iterator<Item = (String, Tensor<B, 1>, Tensor<B, 1>)> + '_ {
        self.segments.iter().map(|s| {
            let r = s.offset..s.offset + s.len;
            (s.path.clone(), self.m.clone().slice(r.clone()), self.v.clone().slice(r))
        })
    }
}

/// AdamW over all trainable parameters at once: every step lays the gradients end to end and
/// updates parameters kept end to end with one kernel. Per-parameter updates launched about
/// five kernels for each of a LoRA model's hundreds of small tensors; on a GPU the host's
/// launch cost, not the arithmetic, set the step time.
///
/// [`AdamW::update`] expects the module that the previous `update` (or [`AdamW::revert`])
/// returned: it reuses the parameters it keeps rather than gathering them again. Anything else
/// that replaces trainable parameters between updates must start a new optimizer or restore
/// its moments ([`AdamW::restore_moments`] drops what it keeps). Debug builds check this.
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    /// Updates applied so far (PyTorch's `step`, for bias correction; one count for all
    /// parameters, where PyTorch keeps one per parameter: they differ only for a parameter that
    /// went without a gradient).
    pub step: usize,
    flat: Option<Flat<B>>,
    /// Moments of parameters outside `flat`: restored from a checkpoint and not updated yet, or
    /// without a gradient at the last update (PyTorch leaves those untouched too).
    loose: HashMap<String, (Tensor<B, 1>, Tensor<B, 1>)>,
}

/// An update that is queued but not yet accepted: the gradient norm has not reached the host.
/// [`AdamW::revert`] undoes it (a non-finite loss or gradient); dropping it keeps it.
pub struct Pending<B: Backend> {
    square_sum: Option<Tensor<B, 1>>,
    /// The optimizer's buffers before the update, parameters included.
    before: Option<Flat<B>>,
    step_before: usize,
}

impl<B: Backend> Pending<B> {
    /// The sum of all squared gradients, on the device (None: no parameter had a gradient).
    pub fn square_sum(&self) -> Option<Tensor<B, 1>> {
        self.square_sum.clone()
    }

    /// The L2 norm of all gradients together, before clipping (what
    /// `torch.nn.utils.clip_grad_norm_` returns). Waits for the device.
    pub fn grad_norm(&self) -> f64 {
        self.square_sum.clone().map_or(0.0, |s| s.into_scalar().elem::<f64>().sqrt())
    }
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self { config, step: 0, flat: None, loose: HashMap::new() }
    }

    /// First and second moments by parameter path, sorted by path (what a checkpoint saves).
    pub fn moments(&self) -> Vec<(String, Tensor<B, 1>, Tensor<B, 1>)> {
        let mut out: Vec<_> = self.loose.iter().map(|(k, (m, v))| (k.clone(), m.clone(), v.clone())).collect();
        out.extend(self.flat.iter().flat_map(Flat::by_path));
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Sets the moments of the parameter at `path` (checkpoint restore).
    pub fn restore_moments(&mut self, path: String, m: Tensor<B, 1>, v: Tensor<B, 1>) {
        self.unflatten();
        self.loose.insert(path, (m, v));
    }

    fn unflatten(&mut self) {
        if let Some(f) = self.flat.take() {
            self.loose.extend(f.by_path().map(|(path, m, v)| (path, (m, v))));
        }
    }
}

impl<B: AdamWOp> AdamW<B> {
    /// Queues one update of every parameter of `module` that has a gradient in `grads`, the
    /// gradients first clipped to the global norm `max_grad_norm` (0: no clipping). Nothing
    /// waits for the device; the returned [`Pending`] reads the norm and can undo the update.
    pub fn update<AB, M>(&mut self, module: M, grads: &mut GradientsParams, lr: f64, max_grad_norm: f64) -> (M, Pending<B>)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: Module<AB>,
    {
        let step_before = self.step;
        self.step += 1;
        let mut collect = Collect::<AB> { path: Vec::new(), grads, found: Vec::new() };
        module.visit(&mut collect);
        let found = collect.found;
        let Some(device) = found.first().map(|f| f.grad.device()) else {
            return (module, Pending { square_sum: None, before: None, step_before });
        };

        let flat = self.layout(&found, &device);
        let total = flat.m.dims()[0];
        let g = gather(found.iter().map(|f| f.grad.clone()), &flat.segments, total, &device);
        let p = match flat.p.clone() {
            Some(p) => {
                if cfg!(debug_assertions) {
                    let gathered = gather(found.iter().map(|f| f.value.clone()), &flat.segments, total, &device);
                    let diff = (gathered - p.clone()).abs().max().into_scalar().elem::<f64>();
                    assert!(diff == 0.0, "AdamW::update got parameters it did not leave (max difference {diff}); see the contract on `AdamW`");
                }
                p
            }
            None => gather(found.iter().map(|f| f.value.clone()), &flat.segments, total, &device),
        };
        let square_sum = g.clone().powi_scalar(2).sum();
        let c = self.config;
        let step = AdamWStep { lr, beta1: c.beta1, beta2: c.beta2, eps: c.eps, weight_decay: c.weight_decay, max_grad_norm, t: self.step as i32 };
        let (p_new, m, v) = kiln_kernels::adamw(p.clone(), g, flat.m.clone(), flat.v.clone(), &step, step.to_device(&device), square_sum.clone());
        let module = assign(module, &p_new, &flat.segments);
        self.flat = Some(Flat { segments: flat.segments.clone(), m, v, p: Some(p_new) });
        (module, Pending { square_sum: Some(square_sum), before: Some(Flat { p: Some(p), ..flat }), step_before })
    }

    /// Undoes `pending`'s update: parameters, moments and step count as they were before it.
    pub fn revert<AB, M>(&mut self, module: M, pending: Pending<B>) -> M
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: Module<AB>,
    {
        self.step = pending.step_before;
        let Some(flat) = pending.before else { return module };
        let module = match &flat.p {
            Some(p) => assign(module, p, &flat.segments),
            None => module,
        };
        self.flat = Some(flat);
        module
    }

    /// The flat buffers for this step's parameters, in `found`'s order: the last step's when
    /// the same parameters have gradients (every step of a LoRA run), else moments rebuilt from
    /// those by path (zeros for a parameter seen for the first time) and no parameters kept.
    fn layout(&mut self, found: &[Found<B>], device: &B::Device) -> Flat<B> {
        let mut segments = Vec::with_capacity(found.len());
        let mut offset = 0;
        for f in found {
            segments.push(Segment { path: f.path.clone(), offset, len: f.len });
            offset += f.len.div_ceil(SEGMENT_ALIGN) * SEGMENT_ALIGN;
        }
        if let Some(flat) = &self.flat {
            if flat.segments == segments {
                return flat.clone();
            }
        }
        self.unflatten();
        let (mut ms, mut vs) = (Vec::new(), Vec::new());
        for s in &segments {
            let (m, v) = self.loose.remove(&s.path).unwrap_or_else(|| (Tensor::zeros([s.len], device), Tensor::zeros([s.len], device)));
            ms.push(m);
            vs.push(v);
        }
        let m = gather(ms, &segments, offset, device);
        let v = gather(vs, &segments, offset, device);
        Flat { segments, m, v, p: None }
    }
}

/// One parameter with a gradient, flattened.
struct Found<B: Backend> {
    path: String,
    len: usize,
    value: Tensor<B, 1>,
    grad: Tensor<B, 1>,
}

/// Takes the gradients of `module`'s parameters out of `grads`, in module order.
struct Collect<'a, AB: AutodiffBackend> {
    path: Vec<String>,
    grads: &'a mut GradientsParams,
    found: Vec<Found<AB::InnerBackend>>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for Collect<'_, AB> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let Some(grad) = self.grads.remove::<AB::InnerBackend, D>(param.id) else { return };
        let len = grad.shape().num_elements();
        let value = param.val().inner().reshape([len]);
        self.found.push(Found { path: self.path.join("."), len, value, grad: grad.reshape([len]) });
    }
}

/// `parts` laid out at `segments`' offsets in one `[total]` tensor, zeros between them.
fn gather<B: AdamWOp>(parts: impl IntoIterator<Item = Tensor<B, 1>>, segments: &[Segment], total: usize, device: &B::Device) -> Tensor<B, 1> {
    let offsets: Vec<usize> = segments.iter().map(|s| s.offset).collect();
    kiln_kernels::adamw::gather(parts.into_iter().collect(), &offsets, total, device)
}

/// Replaces the parameters at `segments`' paths with their cut of `flat`.
fn assign<AB: AutodiffBackend, M: Module<AB>>(module: M, flat: &Tensor<AB::InnerBackend, 1>, segments: &[Segment]) -> M {
    struct Assign<'a, AB: AutodiffBackend> {
        path: Vec<String>,
        flat: &'a Tensor<AB::InnerBackend, 1>,
        by_path: HashMap<&'a str, &'a Segment>,
    }
    impl<AB: AutodiffBackend> ModuleMapper<AB> for Assign<'_, AB> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
            let (id, tensor, mapper) = param.consume();
            let Some(s) = self.by_path.get(self.path.join(".").as_str()) else {
                return Param::from_mapped_value(id, tensor, mapper);
            };
            let value = self.flat.clone().slice(s.offset..s.offset + s.len).reshape(tensor.dims());
            let mut t = Tensor::from_inner(value);
            if tensor.is_require_grad() {
                t = t.require_grad();
            }
            Param::from_mapped_value(id, t, mapper)
        }
    }
    let by_path = segments.iter().map(|s| (s.path.as_str(), s)).collect();
    module.map(&mut Assign::<AB> { path: Vec::new(), flat, by_path })
}

/// The L2 norm of all gradients together (what `torch.nn.utils.clip_grad_norm_` returns).
pub fn global_grad_norm<AB: AutodiffBackend, M: Module<AB>>(module: &M, grads: &GradientsParams) -> f64 {
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
    v.sum.map_or(0.0, |s| s.into_scalar().elem::<f64>().sqrt())
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


#[cfg(test)]
mod tests {
    use super::*;

    type AB = burn::backend::Autodiff<crate::backend::Cpu>;

    /// Three parameters of lengths that are not multiples of [`SEGMENT_ALIGN`].
    #[derive(Module, Debug)]
    struct Three<B: Backend> {
        a: Param<Tensor<B, 2>>,
        b: Param<Tensor<B, 1>>,
        c: Param<Tensor<B, 2>>,
    }

    const SHAPES: [&[usize]; 3] = [&[3, 5], &[7], &[2, 70]];

    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
            })
            .collect()
    }

    fn model(device: &burn::tensor::Device<AB>) -> Three<AB> {
        let p = |i: usize, shape: &[usize]| -> Vec<f32> { values(100 + i as u64, shape.iter().product()) };
        Three {
            a: Param::from_tensor(Tensor::from_data(TensorData::new(p(0, SHAPES[0]), SHAPES[0]), device).require_grad()),
            b: Param::from_tensor(Tensor::from_data(TensorData::new(p(1, SHAPES[1]), SHAPES[1]), device).require_grad()),
            c: Param::from_tensor(Tensor::from_data(TensorData::new(p(2, SHAPES[2]), SHAPES[2]), device).require_grad()),
        }
    }

    /// Gradients equal to `weights` (of `Σ weight·param`); `c` takes no part when `with_c` is off.
    fn grads(m: &Three<AB>, step: u64, scale: f32, with_c: bool) -> (GradientsParams, [Vec<f32>; 3]) {
        let device = Default::default();
        let w: [Vec<f32>; 3] = std::array::from_fn(|i| values(step * 10 + i as u64 + 1, SHAPES[i].iter().product()).iter().map(|x| x * scale).collect());
        let wa = Tensor::<AB, 2>::from_data(TensorData::new(w[0].clone(), SHAPES[0]), &device);
        let wb = Tensor::<AB, 1>::from_data(TensorData::new(w[1].clone(), SHAPES[1]), &device);
        let wc = Tensor::<AB, 2>::from_data(TensorData::new(w[2].clone(), SHAPES[2]), &device);
        let mut loss = (m.a.val() * wa).sum() + (m.b.val() * wb).sum();
        if with_c {
            loss = loss + (m.c.val() * wc).sum();
        }
        (GradientsParams::from_grads(loss.backward(), m), w)
    }

    fn host<const D: usize>(p: &Param<Tensor<AB, D>>) -> Vec<f32> {
        p.val().into_data().convert::<f32>().into_vec().unwrap()
    }

    /// PyTorch's `clip_grad_norm_` then `AdamW.step`, in f64, over the parameters given
    /// gradients; the bias corrections count steps of the optimizer, not of each parameter
    /// (PyTorch's own count differs only for a parameter that went without a gradient).
    struct Reference {
        p: [Vec<f64>; 3],
        m: [Vec<f64>; 3],
        v: [Vec<f64>; 3],
        t: i32,
    }

    impl Reference {
        fn step(&mut self, g: &[Option<&Vec<f32>>; 3], lr: f64, max_norm: f64, c: AdamWConfig) {
            let norm = g.iter().flatten().flat_map(|g| g.iter()).map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            let scale = if max_norm > 0.0 && norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 };
            self.t += 1;
            let (c1, c2) = (1.0 - c.beta1.powi(self.t), 1.0 - c.beta2.powi(self.t));
            for i in 0..3 {
                let Some(g) = g[i] else { continue };
                for j in 0..g.len() {
                    let gj = g[j] as f64 * scale;
                    self.m[i][j] = c.beta1 * self.m[i][j] + (1.0 - c.beta1) * gj;
                    self.v[i][j] = c.beta2 * self.v[i][j] + (1.0 - c.beta2) * gj * gj;
                    self.p[i][j] = self.p[i][j] * (1.0 - lr * c.weight_decay) - lr * (self.m[i][j] / c1) / ((self.v[i][j] / c2).sqrt() + c.eps);
                }
            }
        }

        fn assert_matches(&self, m: &Three<AB>, what: &str) {
            for (i, got) in [host(&m.a), host(&m.b), host(&m.c)].iter().enumerate() {
                for (j, (&x, &r)) in got.iter().zip(&self.p[i]).enumerate() {
                    assert!((x as f64 - r).abs() < 1e-6, "{what}: parameter {i}[{j}] = {x}, reference {r}");
                }
            }
        }
    }

    /// Clipping on and off, weight decay, a step without `c`'s gradient (its moments and value
    /// kept, as PyTorch keeps those of a parameter whose `grad` is None), a reverted step, and
    /// moments moved through a checkpoint into a fresh optimizer.
    #[test]
    fn flat_adamw_matches_pytorch_formulas() {
        let device = Default::default();
        let config = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
        let mut model = model(&device);
        let mut reference = Reference { p: [0, 1, 2].map(|i| values(100 + i as u64, SHAPES[i].iter().product()).iter().map(|&x| x as f64).collect()), m: SHAPES.map(|s| vec![0.0; s.iter().product()]), v: SHAPES.map(|s| vec![0.0; s.iter().product()]), t: 0 };
        let mut opt = AdamW::<crate::backend::Cpu>::new(config);
        // (gradient scale, max norm, with c): the norm of the first is about 5, so 1.0 clips.
        for (step, (scale, max_norm, with_c)) in [(1.0, 1.0, true), (0.1, 1.0, true), (1.0, 0.0, false), (1.0, 1.0, true)].into_iter().enumerate() {
            let (mut g, w) = grads(&model, step as u64, scale, with_c);
            let (updated, pending) = opt.update(model, &mut g, 1e-2, max_norm);
            model = updated;
            let norm = w.iter().take(if with_c { 3 } else { 2 }).flatten().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            assert!((pending.grad_norm() - norm).abs() < 1e-5 * norm, "step {step}: norm {} vs {norm}", pending.grad_norm());
            reference.step(&[Some(&w[0]), Some(&w[1]), with_c.then_some(&w[2])], 1e-2, max_norm, config);
            reference.assert_matches(&model, &format!("step {step}"));
        }

        // An update that the trainer rejects (non-finite loss) leaves no trace.
        let (mut g, _) = grads(&model, 9, 1.0, true);
        let (updated, pending) = opt.update(model, &mut g, 1e-2, 1.0);
        model = opt.revert(updated, pending);
        assert_eq!(opt.step, 4);
        reference.assert_matches(&model, "reverted");

        // Moments through a checkpoint: a fresh optimizer continues exactly.
        let mut fresh = AdamW::<crate::backend::Cpu>::new(config);
        fresh.step = opt.step;
        for (path, m, v) in opt.moments() {
            assert_eq!(m.dims()[0], SHAPES[["a", "b", "c"].iter().position(|p| *p == path).unwrap()].iter().product::<usize>());
            fresh.restore_moments(path, m, v);
        }
        let (mut g, w) = grads(&model, 5, 1.0, true);
        let (model, _) = fresh.update(model, &mut g, 1e-2, 1.0);
        reference.step(&[Some(&w[0]), Some(&w[1]), Some(&w[2])], 1e-2, 1.0, config);
        reference.assert_matches(&model, "after restore");
    }
}
