//! The pieces every decoder shares: linear layers with HF weight names, RMSNorm, rotary
//! embeddings and attention masks.
//!
//! Weights load straight from HF names (`q_proj.weight` is `[out, in]`); [`Linear`] keeps the
//! transpose `[in, out]` so that a forward is one matmul, as Burn's own `Linear` does.

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::{FloatDType, TensorData};

use kiln_kernels::host::HostQuant;
use kiln_kernels::{gated_act, Affine, GateActivation, QuantMatmul};

use super::config::{RopeConfig, RopeScaling};
use crate::quant::affine::QuantSpec;
use super::weights::WeightFiles;
use super::ModelError;

/// Loads `name` from `files` as a tensor of `shape` on `device`.
pub fn load_tensor<B: Backend, const D: usize>(
    files: &WeightFiles,
    name: &str,
    shape: [usize; D],
    device: &B::Device,
) -> Result<Tensor<B, D>, ModelError> {
    let data = files.f32(name, &shape)?;
    Ok(Tensor::from_data(TensorData::new(data, shape), device))
}

/// Row-major `[rows, cols]` -> row-major `[cols, rows]`.
pub fn transpose_host(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// `y = x·W + b`, with `W` stored `[in, out]`, or quantised.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    pub weight: LinearWeight<B>,
    /// [out]
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// A low-rank update added to the output when this layer is adapted.
    pub lora: Option<crate::lora::Lora<B>>,
}

/// A linear layer's weight: a float matrix, or affine-quantised and multiplied by the
/// kernels of `kiln-kernels`, which dequantise in registers and never form the float matrix.
/// A quantised weight is frozen (it holds no `Param`); LoRA on top of it is QLoRA.
#[derive(Module, Debug)]
pub enum LinearWeight<B: Backend> {
    /// [in, out]
    Dense(Param<Tensor<B, 2>>),
    Quant(QuantWeight<B>),
}

/// An affine-quantised weight in HF orientation (`n = out` rows of `k = in` weights):
/// `w[o, j] = scales[o, j/group] · level(o, j) + biases[o, j/group]`.
#[derive(Module, Debug)]
pub struct QuantWeight<B: Backend> {
    /// [out, in·bits/32]
    pub words: Tensor<B, 2, Int>,
    /// [out, in/group]
    pub scales: Tensor<B, 2>,
    /// [out, in/group]
    pub biases: Tensor<B, 2>,
    #[module(skip)]
    pub format: Affine,
}

impl<B: Backend> Linear<B> {
    /// Loads `{prefix}.weight` (HF `[out, in]`) and, if `bias`, `{prefix}.bias`. A weight the
    /// checkpoint stores MLX-quantised (`weight` uint32 + `scales` + `biases`) stays quantised;
    /// a float weight is quantised here when `quantize` asks for it.
    pub fn load(files: &WeightFiles, prefix: &str, d_in: usize, d_out: usize, bias: bool, quantize: Option<QuantSpec>, device: &B::Device) -> Result<Self, ModelError> {
        let name = format!("{prefix}.weight");
        let bias = if bias {
            Some(Param::from_tensor(load_tensor::<B, 1>(files, &format!("{prefix}.bias"), [d_out], device)?))
        } else {
            None
        };
        if let Some(stored) = files.mlx_quantized(&name, d_out, d_in)? {
            if let Some(spec) = quantize {
                if spec.affine() != Some(stored.format) {
                    return Err(ModelError::AlreadyQuantized { name, stored: describe(stored.format), requested: spec.to_string() });
                }
            }
            return Ok(Self::from_quant(&stored, bias, device));
        }
        let weight = files.f32(&name, &[d_out, d_in])?;
        Self::from_host(name, &weight, d_out, d_in, bias, quantize, device)
    }

    /// A layer from an HF-layout weight on the host (`[out, in]`), quantised with `quantize`
    /// when given; `name` is for error messages.
    pub fn from_host(name: String, weight: &[f32], d_out: usize, d_in: usize, bias: Option<Param<Tensor<B, 1>>>, quantize: Option<QuantSpec>, device: &B::Device) -> Result<Self, ModelError> {
        match quantize {
            Some(spec) => {
                let q = spec.quantize(weight, d_out, d_in).map_err(|e| {
                    let mut message = e.to_string();
                    if let QuantSpec::Mlx { bits, group } = spec {
                        let fits: Vec<String> = [32, 64, 128].iter().filter(|g| d_in % *g == 0 && **g != group).map(|g| format!("q{bits}_g{g}")).collect();
                        if !fits.is_empty() {
                            message.push_str(&format!(" (rows of {d_in} split into whole groups with {})", fits.join(" or ")));
                        }
                    }
                    ModelError::Quantize { name, message }
                })?;
                Ok(Self::from_quant(&q, bias, device))
            }
            None => Ok(Self::from_hf(weight, d_out, d_in, bias.map(|b| b.val()), device)),
        }
    }

    /// A layer from an HF-layout weight (`[out, in]`, row-major host data) and optional bias.
    /// The transpose happens on the host: a transposed *view* on the device would make the
    /// backend copy the whole weight into matmul order on every call.
    pub fn from_hf(weight_out_in: &[f32], d_out: usize, d_in: usize, bias: Option<Tensor<B, 1>>, device: &B::Device) -> Self {
        let w = transpose_host(weight_out_in, d_out, d_in); // [out, in] -> [in, out]
        let weight = Tensor::from_data(TensorData::new(w, [d_in, d_out]), device);
        Self { weight: LinearWeight::Dense(Param::from_tensor(weight)), bias: bias.map(Param::from_tensor), lora: None }
    }

    /// A layer over a quantised weight (already in the kernels' layout).
    pub fn from_quant(q: &HostQuant, bias: Option<Param<Tensor<B, 1>>>, device: &B::Device) -> Self {
        let (words, scales, biases) = q.to_tensors::<B>(device);
        let weight = LinearWeight::Quant(QuantWeight { words, scales, biases, format: q.format });
        Self { weight, bias, lora: None }
    }

    pub fn d_in(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.dims()[0],
            LinearWeight::Quant(q) => q.words.dims()[1] * q.format.per_word(),
        }
    }

    pub fn d_out(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.dims()[1],
            LinearWeight::Quant(q) => q.words.dims()[0],
        }
    }

    /// The quantisation of the weight, if it is quantised.
    pub fn quant_format(&self) -> Option<Affine> {
        match &self.weight {
            LinearWeight::Dense(_) => None,
            LinearWeight::Quant(q) => Some(q.format),
        }
    }

    /// The weight as a float `[in, out]` matrix; a quantised weight is dequantised (what
    /// saving or fusing an adapter into a quantised base works on).
    pub fn dense_weight(&self) -> Tensor<B, 2> {
        match &self.weight {
            LinearWeight::Dense(w) => w.val().cast(FloatDType::F32),
            LinearWeight::Quant(q) => kiln_kernels::dequantize(q.words.clone(), q.scales.clone(), q.biases.clone(), q.format).transpose(),
        }
    }
}

impl<B: QuantMatmul> Linear<B> {
    /// `x` `[.., in]` -> `[.., out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        // One 2-D product over every row: against a weight broadcast over a batch dimension,
        // backward would sum each adapter's gradient over the batch (a reduction per matrix).
        let dims = x.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let input = x.clone();
        let x = x.reshape([rows, dims[D - 1]]); // [n, in]
        let mut lora = self.lora.as_ref();
        let y = match &self.weight {
            // A bf16 weight is frozen ([`to_bf16_matmuls`]): multiplied in bf16 with f32
            // accumulation, as under PyTorch's autocast, the matmul writing the f32 result;
            // with its adapter in the same operation when both see the same input. That
            // operation takes the input as it is (not its rows' view), so that projections of
            // one input (queries, keys, values) add their gradients into one tensor.
            LinearWeight::Dense(w) if w.dtype() == burn::tensor::DType::BF16 => match lora.take_if(|l| !l.drops(&x.device())) {
                Some(l) => kiln_kernels::frozen_lora(input, w.val(), l.a.val(), l.b.val(), l.scale).reshape([rows, self.d_out()]),
                None => kiln_kernels::frozen_matmul(x.clone(), w.val()),
            },
            LinearWeight::Dense(w) => x.clone().matmul(w.val()),
            LinearWeight::Quant(q) => kiln_kernels::quant_matmul(x.clone(), q.words.clone(), q.scales.clone(), q.biases.clone(), q.format),
        };
        let y = match &self.bias {
            Some(b) => y + b.val().unsqueeze::<2>(),
            None => y,
        };
        let y = match lora {
            Some(lora) => y + lora.forward(x),
            None => y,
        };
        let mut out = dims;
        out[D - 1] = self.d_out();
        y.reshape(out)
    }

    /// Whether [`Self::forward`] multiplies a bf16 input as it is: a frozen bf16 weight whose
    /// adapter (if any) has no dropout, so that the adapter reads the same input. Then the
    /// norm before it may write bf16 ([`RmsNorm::forward_as`]).
    pub fn reads_bf16(&self) -> bool {
        matches!(&self.weight, LinearWeight::Dense(w) if w.dtype() == burn::tensor::DType::BF16) && self.lora.as_ref().is_none_or(|l| l.dropout == 0.0)
    }

    /// `self.forward(act(gate) · up)`: through [`kiln_kernels::gated_down`] where
    /// [`Self::writes_bf16`] (no adapter dropout), whose backward recomputes `act(gate) · up`
    /// rather than keeping it, the largest tensor a layer would keep.
    pub fn forward_gated<const D: usize>(&self, gate: Tensor<B, D>, up: Tensor<B, D>, act: GateActivation) -> Tensor<B, D> {
        match (&self.weight, &self.lora) {
            (LinearWeight::Dense(w), Some(l)) if self.writes_bf16() && l.dropout == 0.0 => kiln_kernels::gated_down(gate, up, act, w.val(), l.a.val(), l.b.val(), l.scale),
            _ => self.forward(gated_act(gate, up, act)),
        }
    }

    /// Whether [`Self::forward_bf16`] writes bf16: a frozen bf16 weight with its adapter (the
    /// one product that can write its result in bf16 directly) and no bias.
    pub fn writes_bf16(&self) -> bool {
        matches!(&self.weight, LinearWeight::Dense(w) if w.dtype() == burn::tensor::DType::BF16) && self.lora.is_some() && self.bias.is_none()
    }

    /// [`Self::forward`] with the result in bf16 where [`Self::writes_bf16`] (and no adapter
    /// dropout is active), in f32 otherwise: for outputs that only feed an element-wise
    /// operation reading bf16 (the gated MLP's gate and up), which saves a cast and half the
    /// memory of the `[tokens, intermediate]` tensors the tape keeps, and half their traffic.
    ///
    /// The adapter's term is added into the bf16 product, as PyTorch's autocast adds PEFT's:
    /// while `B` is still near zero (the first steps) part of it falls below bf16's resolution
    /// of the product. Measured on the H100 (bench/RESULTS.md): the Qwen2.5-0.5B shape's loss
    /// after the first update 12.024 against 11.986 with f32 outputs, within 0.1 % by step 6.
    pub fn forward_bf16<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let (LinearWeight::Dense(w), Some(l)) = (&self.weight, &self.lora) else {
            return self.forward(x);
        };
        if !self.writes_bf16() || l.drops(&x.device()) {
            return self.forward(x);
        }
        // The input as it is, as in `forward`: gate and up add their gradients into one tensor.
        kiln_kernels::frozen::frozen_lora_as(x, w.val(), l.a.val(), l.b.val(), l.scale, FloatDType::BF16)
    }
}

/// Stores every frozen dense projection weight (attention, MLP, experts, an untied LM head)
/// in bf16, so that [`Linear::forward`] multiplies in bf16; trainable weights, adapters, norms
/// and embeddings stay as they are. Returns how many weights were converted.
pub fn to_bf16_matmuls<B: Backend, M: Module<B>>(module: M) -> (M, usize) {
    struct ToBf16 {
        path: Vec<String>,
        converted: usize,
    }
    impl<B: Backend> ModuleMapper<B> for ToBf16 {
        fn enter_module(&mut self, _: &str, container: &str) {
            self.path.push(container.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let in_linear_weight = self.path.last().is_some_and(|c| c == "Enum:LinearWeight");
            let (id, tensor, mapper) = param.consume();
            if !in_linear_weight || D != 2 || tensor.is_require_grad() {
                return Param::from_mapped_value(id, tensor, mapper);
            }
            self.converted += 1;
            Param::from_mapped_value(id, tensor.cast(FloatDType::BF16), mapper)
        }
    }
    let mut mapper = ToBf16 { path: Vec::new(), converted: 0 };
    let module = module.map(&mut mapper);
    (module, mapper.converted)
}

/// `q4_g64`-style name of an affine format (the MLX spec that names it).
pub fn describe(format: Affine) -> String {
    QuantSpec::Mlx { bits: format.bits, group: format.group as usize }.to_string()
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) · (offset + w)`.
/// Gemma stores `w` as an offset from one (`offset = 1`), the others use `offset = 0`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// [d]
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
    pub offset: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn load(files: &WeightFiles, name: &str, dim: usize, eps: f64, offset: f64, device: &B::Device) -> Result<Self, ModelError> {
        let weight = load_tensor::<B, 1>(files, &format!("{name}.weight"), [dim], device)?;
        Ok(Self { weight: Param::from_tensor(weight), eps, offset })
    }

    /// One operation with its own backward ([`kiln_kernels::rms_norm`]): a kernel each way on
    /// the CubeCL backends, the plain composition elsewhere.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D>
    where
        B: kiln_kernels::RmsNormOp,
    {
        self.forward_as(x, FloatDType::F32)
    }

    /// [`Self::forward`] written in `out` (bf16 where only bf16 products read it).
    pub fn forward_as<const D: usize>(&self, x: Tensor<B, D>, out: FloatDType) -> Tensor<B, D>
    where
        B: kiln_kernels::RmsNormOp,
    {
        kiln_kernels::rms_norm_as(x, self.weight.val(), self.eps, self.offset, out)
    }
}

/// `x / sqrt(mean(x²) + eps)` over the last dimension, with no weight.
pub fn rms_normalize<B: Backend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    let rms = x.clone().powi_scalar(2).mean_dim(D - 1).add_scalar(eps).sqrt(); // [.., 1]
    x.div(rms)
}

/// Inverse frequencies of one rope, computed in f32 as transformers does (its tables are f32,
/// and matching their rounding keeps logits within 1e-6 of the reference).
pub fn inv_freq(rope: &RopeConfig) -> Vec<f32> {
    let dim = rope.rotary_dim;
    let base: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0 / (rope.theta as f32).powf((2 * i) as f32 / dim as f32))
        .collect();
    match rope.scaling {
        RopeScaling::None => base,
        RopeScaling::Proportional { angles, factor } => {
            base.iter().enumerate().map(|(i, &f)| if i < angles { f / factor as f32 } else { 0.0 }).collect()
        }
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
            let low_wavelen = original_max_position / low_freq_factor;
            let high_wavelen = original_max_position / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let f = f as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let out = if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    };
                    out as f32
                })
                .collect()
        }
    }
}

/// cos and sin tables `[rows, len, rotary_dim]` for the given positions (`rows · len` of them,
/// row-major), laid out as transformers' `cat(freqs, freqs)` (rotate-half convention).
pub fn rope_tables<B: Backend>(inv_freq: &[f32], positions: &[usize], rows: usize, device: &B::Device) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(positions.len() * half * 2);
    let mut sin = Vec::with_capacity(positions.len() * half * 2);
    for &p in positions {
        for _ in 0..2 {
            for &f in inv_freq {
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    let shape = [rows, positions.len() / rows.max(1), half * 2];
    (
        Tensor::from_data(TensorData::new(cos, shape), device),
        Tensor::from_data(TensorData::new(sin, shape), device),
    )
}

/// Applies rotate-half rope to `x` `[b, h, s, d]` with tables `[b or 1, s, r]` (r ≤ d rotate,
/// the rest pass through unchanged), as one operation whose backward keeps only the tables
/// ([`kiln_kernels::rope`]).
pub fn apply_rope<B: kiln_kernels::RopeOp>(x: Tensor<B, 4>, cos: &Tensor<B, 3>, sin: &Tensor<B, 3>) -> Tensor<B, 4> {
    kiln_kernels::rope(x, cos.clone(), sin.clone())
}

/// Additive attention mask `[1, s, t]` for `s` queries at positions `past..past + s` over
/// `t = kept + s` keys, the last `kept` cached positions and the new ones (a sliding-window
/// layer's cache keeps only its window): 0 where a query may look, -inf elsewhere (the
/// future, and keys `window` or more positions back).
pub fn causal_mask<B: Backend>(s: usize, past: usize, kept: usize, window: Option<usize>, device: &B::Device) -> Tensor<B, 3> {
    let t = kept + s;
    let first = past - kept;
    let mut data = vec![0f32; s * t];
    for i in 0..s {
        let q = past + i;
        for k in 0..t {
            if !may_attend(q, first + k, window) {
                data[i * t + k] = f32::NEG_INFINITY;
            }
        }
    }
    Tensor::from_data(TensorData::new(data, [1, s, t]), device)
}

/// Block-diagonal causal mask `[b, s, s]` for packed rows: a query sees earlier keys of its own
/// segment only, so examples packed into one row never attend to each other.
///
/// Built on the device from the `[b, s]` segment ids and positions: a host-built mask is
/// `b·s²` floats to fill and upload every step (32 MB at 8 × 1024), which held the GPU up
/// between steps.
pub fn packed_mask<B: Backend>(segments: &[u32], positions: &[u32], rows: usize, window: Option<usize>, device: &B::Device) -> Tensor<B, 3> {
    let s = segments.len() / rows.max(1);
    let ints = |v: &[u32]| Tensor::<B, 2, Int>::from_data(TensorData::new(v.iter().map(|&x| x as i64).collect::<Vec<_>>(), [rows, s]), device);
    let queries = |t: Tensor<B, 2, Int>| t.reshape([rows, s, 1]).expand([rows, s, s]); // value of the query's row
    let keys = |t: Tensor<B, 2, Int>| t.reshape([rows, 1, s]).expand([rows, s, s]); // value of the key's column
    let (seg, pos) = (ints(segments), ints(positions));
    let index = Tensor::<B, 1, Int>::arange(0..s as i64, device).reshape([1, s]).expand([rows, s]);
    let mut visible = queries(seg.clone()).equal(keys(seg)).bool_and(keys(index.clone()).lower_equal(queries(index)));
    let (pq, pk) = (queries(pos.clone()), keys(pos));
    visible = visible.bool_and(pk.clone().lower_equal(pq.clone()));
    if let Some(w) = window {
        visible = visible.bool_and((pq - pk).lower_elem(w as i64));
    }
    Tensor::<B, 3>::zeros([rows, s, s], device).mask_fill(visible.bool_not(), f32::NEG_INFINITY)
}

fn may_attend(q: usize, k: usize, window: Option<usize>) -> bool {
    k <= q && window.is_none_or(|w| q < k + w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;

    #[test]
    fn sliding_mask_keeps_window_including_self() {
        let m = causal_mask::<Cpu>(4, 0, 0, Some(2), &Default::default());
        assert_eq!(m.dims(), [1, 4, 4]);
        let v = m.into_data().to_vec::<f32>().unwrap();
        let allowed: Vec<bool> = v.iter().map(|x| x.is_finite()).collect();
        #[rustfmt::skip]
        let expected = [
            true, false, false, false,
            true, true, false, false,
            false, true, true, false,
            false, false, true, true,
        ];
        assert_eq!(allowed, expected);
    }

    #[test]
    fn packed_mask_matches_its_definition() {
        // Two rows: three segments, then two segments with a padding run (segment 9).
        let segments = [0, 0, 0, 1, 1, 2, 2, 2, 0, 0, 0, 0, 0, 1, 1, 9u32];
        let positions = [0, 1, 2, 0, 1, 0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 0u32];
        let s = 8;
        for window in [None, Some(2)] {
            let m = packed_mask::<Cpu>(&segments, &positions, 2, window, &Default::default());
            assert_eq!(m.dims(), [2, s, s]);
            let got: Vec<bool> = m.into_data().to_vec::<f32>().unwrap().iter().map(|x| x.is_finite()).collect();
            let mut want = Vec::new();
            for r in 0..2 {
                for q in 0..s {
                    for k in 0..s {
                        let (i, j) = (r * s + q, r * s + k);
                        want.push(k <= q && segments[i] == segments[j] && may_attend(positions[i] as usize, positions[j] as usize, window));
                    }
                }
            }
            assert_eq!(got, want, "window {window:?}");
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies() {
        let rope = RopeConfig {
            theta: 500000.0,
            rotary_dim: 128,
            scaling: RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position: 8192.0 },
        };
        let plain = inv_freq(&RopeConfig { scaling: RopeScaling::None, ..rope.clone() });
        let scaled = inv_freq(&rope);
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-12);
    }
}
