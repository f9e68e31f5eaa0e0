//! The allow list: the globals a `torch.save` state dict names, each understood as
//! data (never called), and the training-state names that load as inert placeholders.
use super::DType;

/// A callable or class the unpickler recognises. Nothing else can be named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Global {
    /// `collections.OrderedDict`: builds a dict.
    OrderedDict,
    /// `torch._utils._rebuild_tensor(storage, storage_offset, size, stride)`.
    RebuildTensor,
    /// `torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])`.
    RebuildTensorV2,
    /// `torch._utils._rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype[, metadata])`.
    RebuildTensorV3,
    /// `torch._utils._rebuild_parameter(tensor, requires_grad, backward_hooks)`.
    RebuildParameter,
    /// `torch._utils._rebuild_parameter_with_state(tensor, requires_grad, backward_hooks, state)`.
    RebuildParameterWithState,
    /// A storage class such as `torch.HalfStorage` (`torch.UntypedStorage` holds bytes).
    Storage(DType),
    /// A dtype object such as `torch.float16`.
    Dtype(DType),
    /// Training metadata that real checkpoints carry; see [`INERT_GLOBALS`].
    Inert(&'static str),
}

/// Globals found outside the weights of real SD checkpoints, read as opaque
/// placeholders (nothing is called; the values are ignored).
pub const INERT_GLOBALS: &[&str] = &[
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy.dtype",
    "_codecs.encode",
];

impl Global {
    /// Maps `module.name` to an allowed global, or `None` for anything else.
    pub fn resolve(module: &str, name: &str) -> Option<Global> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_tensor_v3") => Global::RebuildTensorV3,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
            ("torch", n) => {
                if let Some(d) = storage_class_dtype(n) {
                    Global::Storage(d)
                } else {
                    Global::Dtype(dtype_object(n)?)
                }
            }
            _ => {
                let dotted = format!("{module}.{name}");
                return INERT_GLOBALS
                    .iter()
                    .find(|g| **g == dotted)
                    .map(|g| Global::Inert(g));
            }
        })
    }

    /// The dotted Python name.
    pub fn python_name(self) -> String {
        match self {
            Global::OrderedDict => "collections.OrderedDict".into(),
            Global::RebuildTensor => "torch._utils._rebuild_tensor".into(),
            Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2".into(),
            Global::RebuildTensorV3 => "torch._utils._rebuild_tensor_v3".into(),
            Global::RebuildParameter => "torch._utils._rebuild_parameter".into(),
            Global::RebuildParameterWithState => {
                "torch._utils._rebuild_parameter_with_state".into()
            }
            Global::Storage(d) => format!(
                "torch.{}",
                storage_class_name(d).unwrap_or("UntypedStorage")
            ),
            Global::Dtype(d) => format!("torch.{}", dtype_object_name(d).unwrap_or("?")),
            Global::Inert(n) => n.to_string(),
        }
    }
}

fn storage_class_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "FloatStorage" => DType::F32,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "DoubleStorage" => DType::F64,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "CharStorage" => DType::I8,
        "ByteStorage" | "UntypedStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        _ => return None,
    })
}

/// The legacy storage class torch names in a persistent id for `dtype`.
pub fn storage_class_name(dtype: DType) -> Option<&'static str> {
    Some(match dtype {
        DType::F32 => "FloatStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::F64 => "DoubleStorage",
        DType::I64 => "LongStorage",
        DType::I32 => "IntStorage",
        DType::I16 => "ShortStorage",
        DType::I8 => "CharStorage",
        DType::U8 => "ByteStorage",
        DType::Bool => "BoolStorage",
        DType::Ggml(_) => return None,
    })
}

fn dtype_object(name: &str) -> Option<DType> {
    Some(match name {
        "float32" => DType::F32,
        "float16" => DType::F16,
        "bfloat16" => DType::BF16,
        "float64" => DType::F64,
        "int64" => DType::I64,
        "int32" => DType::I32,
        "int16" => DType::I16,
        "int8" => DType::I8,
        "uint8" => DType::U8,
        "bool" => DType::Bool,
        _ => return None,
    })
}

fn dtype_object_name(d: DType) -> Option<&'static str> {
    Some(match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        DType::I64 => "int64",
        DType::I32 => "int32",
        DType::I16 => "int16",
        DType::I8 => "int8",
        DType::U8 => "uint8",
        DType::Bool => "bool",
        DType::Ggml(_) => return None,
    })
}
