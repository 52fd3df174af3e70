//! A small pickle virtual machine for PyTorch files. Python's pickles are programs; this runs the
//! opcodes that `torch.save` emits (protocols 2 to 5) without running any Python: known callables
//! (`OrderedDict`, PyTorch's tensor rebuild functions) are interpreted, storage persistent ids become
//! [`StorageRef`]s, and every other class becomes an inert [`Node::Object`]. Containers live in an
//! arena and are referred to by index, so shared, cyclic or deeply nested input cannot blow the
//! stack. Every length read from the file is checked against what remains before it is allocated.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Read;

/// Where a pickle went wrong and what was wrong.
#[derive(Clone, Debug, PartialEq)]
pub struct PickleError {
    /// Byte offset in the file: the opcode being run, or the read that hit the end.
    pub at: u64,
    /// What was expected and what was found.
    pub problem: String,
}

impl fmt::Display for PickleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.problem, self.at)
    }
}

/// A byte source that knows its position and the length of the whole file.
pub struct Input<R> {
    reader: R,
    position: u64,
    len: u64,
}

impl<R: Read> Input<R> {
    /// Reads `reader`, which holds `len` bytes in all.
    pub fn new(reader: R, len: u64) -> Self {
        Input { reader, position: 0, len }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Bytes left.
    pub fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.position)
    }

    /// The next `count` bytes; an error if the file ends first.
    pub fn bytes(&mut self, count: u64) -> Result<Vec<u8>, PickleError> {
        if count > self.remaining() {
            return Err(PickleError {
                at: self.position,
                problem: format!("file truncated: it ends at byte {}, {count} more bytes needed", self.len),
            });
        }
        let mut buffer = vec![0u8; count as usize];
        self.fill(&mut buffer)?;
        Ok(buffer)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let mut buffer = [0u8; N];
        if (N as u64) > self.remaining() {
            return Err(PickleError {
                at: self.position,
                problem: format!("file truncated: it ends at byte {}, {N} more bytes needed", self.len),
            });
        }
        self.fill(&mut buffer)?;
        Ok(buffer)
    }

    fn fill(&mut self, buffer: &mut [u8]) -> Result<(), PickleError> {
        self.reader.read_exact(buffer).map_err(|e| PickleError {
            at: self.position,
            problem: format!("cannot read {} bytes: {e}", buffer.len()),
        })?;
        self.position += buffer.len() as u64;
        Ok(())
    }

    /// A newline-terminated ASCII line (without the newline), at most 256 bytes.
    fn line(&mut self) -> Result<String, PickleError> {
        let start = self.position;
        let mut text = Vec::new();
        loop {
            let [byte] = self.array::<1>()?;
            if byte == b'\n' {
                return Ok(String::from_utf8_lossy(&text).into_owned());
            }
            if text.len() >= 256 {
                return Err(PickleError { at: start, problem: "text line longer than 256 bytes".into() });
            }
            text.push(byte);
        }
    }
}

/// A pickled value. Containers and PyTorch objects are [`Node`]s in the pickle's arena.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `True` or `False`.
    Bool(bool),
    /// An integer (pickles of wider integers are refused).
    Int(i128),
    /// A float.
    Float(f64),
    /// A text string (Python 2 byte strings that are valid UTF-8 included).
    Str(String),
    /// A byte string.
    Bytes(Vec<u8>),
    /// A class or function named by module and name, never imported.
    Global {
        /// Module, e.g. `torch._utils`.
        module: String,
        /// Name in the module, e.g. `_rebuild_tensor_v2`.
        name: String,
    },
    /// A container or object: an index into the arena.
    Node(usize),
}

/// A container or interpreted object.
#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    /// A tuple.
    Tuple(Vec<Value>),
    /// A list (sets too).
    List(Vec<Value>),
    /// A dict or `OrderedDict`, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// An instance of a class this machine does not interpret.
    Object {
        /// The class or callable.
        class: Value,
        /// Its constructor arguments.
        args: Value,
        /// What `BUILD` gave it.
        state: Option<Value>,
    },
    /// A storage named by a persistent id.
    Storage(StorageRef),
    /// A tensor: a strided view of a storage.
    Tensor(TensorRef),
}

/// PyTorch's persistent id `('storage', storage_type, key, location, numel[, view])`.
#[derive(Clone, Debug, PartialEq)]
pub struct StorageRef {
    /// E.g. `torch.FloatStorage`.
    pub type_name: String,
    /// The key of the storage whose data the file holds.
    pub key: String,
    /// Device it was saved from, e.g. `cpu` or `cuda:0`.
    pub location: String,
    /// Elements in that storage.
    pub numel: u64,
    /// Old files' storage views: `(view key, offset, length)` in elements of the root storage.
    pub view: Option<(String, u64, u64)>,
}

/// The arguments of `torch._utils._rebuild_tensor[_v2]`.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    /// The storage.
    pub storage: StorageRef,
    /// First element, in elements of the storage (or view).
    pub offset: i64,
    /// Shape.
    pub size: Vec<i64>,
    /// Strides in elements.
    pub stride: Vec<i64>,
}

/// The result of one pickle: its top value and the arena its nodes live in.
#[derive(Debug)]
pub struct Pickle {
    /// What `STOP` returned.
    pub root: Value,
    heap: Vec<Node>,
}

/// How deep [`Pickle::tensors`] follows nested containers.
const MAX_NESTING: usize = 64;

impl Pickle {
    /// The node that `value` refers to, if it is one.
    pub fn node(&self, value: &Value) -> Option<&Node> {
        match value {
            Value::Node(index) => self.heap.get(*index),
            _ => None,
        }
    }

    /// Every storage that a persistent id named, in the order they appeared.
    pub fn storages(&self) -> impl Iterator<Item = &StorageRef> {
        self.heap.iter().filter_map(|node| match node {
            Node::Storage(storage) => Some(storage),
            _ => None,
        })
    }

    /// Every tensor reachable from the root, named by the dotted path of keys and indices that
    /// leads to it (`state_dict.features.0.weight`). Objects contribute their `BUILD` state, with
    /// `nn.Module`'s `_modules`/`_parameters`/`_buffers` levels left out of the names.
    pub fn tensors(&self) -> Result<Vec<(String, TensorRef)>, String> {
        let mut walk = Walk { pickle: self, seen: HashSet::new(), found: Vec::new() };
        walk.visit(&self.root, String::new(), 0)?;
        Ok(walk.found)
    }
}

/// State of the depth-first search behind [`Pickle::tensors`].
struct Walk<'a> {
    pickle: &'a Pickle,
    seen: HashSet<usize>,
    found: Vec<(String, TensorRef)>,
}

impl Walk<'_> {
    fn visit(&mut self, value: &Value, name: String, depth: usize) -> Result<(), String> {
        let Value::Node(index) = value else { return Ok(()) };
        let Some(node) = self.pickle.heap.get(*index) else { return Ok(()) };
        if let Node::Tensor(tensor) = node {
            self.found.push((name, tensor.clone()));
            return Ok(());
        }
        if depth >= MAX_NESTING {
            return Err(format!("containers nested more than {MAX_NESTING} deep at '{name}'"));
        }
        if !self.seen.insert(*index) {
            return Ok(());
        }
        match node {
            Node::Dict(items) => {
                for (key, item) in items {
                    if let Some(key) = key_text(key) {
                        self.visit(item, join(&name, &key), depth + 1)?;
                    }
                }
            }
            Node::List(items) | Node::Tuple(items) => {
                for (position, item) in items.iter().enumerate() {
                    self.visit(item, join(&name, &position.to_string()), depth + 1)?;
                }
            }
            Node::Object { state: Some(state), .. } => self.visit_object_state(state, &name, depth)?,
            _ => {}
        }
        Ok(())
    }

    /// An object's attributes, skipping the `_modules`/`_parameters`/`_buffers` level of names.
    fn visit_object_state(&mut self, state: &Value, name: &str, depth: usize) -> Result<(), String> {
        let Some(Node::Dict(attributes)) = self.pickle.node(state) else {
            return self.visit(state, name.to_string(), depth + 1);
        };
        for (key, item) in attributes {
            match key_text(key).as_deref() {
                Some("_modules" | "_parameters" | "_buffers") => self.visit(item, name.to_string(), depth + 1)?,
                Some(key) => self.visit(item, join(name, key), depth + 1)?,
                None => {}
            }
        }
        Ok(())
    }
}

fn key_text(key: &Value) -> Option<String> {
    match key {
        Value::Str(text) => Some(text.clone()),
        Value::Int(number) => Some(number.to_string()),
        Value::Bytes(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        _ => None,
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") }
}

/// Runs one pickle from `input` up to and including its `STOP`.
pub fn load<R: Read>(input: &mut Input<R>) -> Result<Pickle, PickleError> {
    let mut machine = Machine::default();
    loop {
        let at = input.position();
        let [opcode] = input
            .array::<1>()
            .map_err(|e| PickleError { problem: format!("{} (the pickle has no STOP)", e.problem), ..e })?;
        match machine.step(opcode, input) {
            Ok(Flow::Continue) => {}
            Ok(Flow::Stop) => return machine.finish(at),
            Err(Fault::Input(error)) => return Err(error),
            Err(Fault::Bad(problem)) => return Err(PickleError { at, problem: describe_fault(opcode, &problem) }),
        }
    }
}

fn describe_fault(opcode: u8, problem: &str) -> String {
    match opcode_name(opcode) {
        Some(name) => format!("{name}: {problem}"),
        None => problem.to_string(),
    }
}

/// Why an opcode failed: the file ended or could not be read, or its content made no sense.
enum Fault {
    Input(PickleError),
    Bad(String),
}

impl From<PickleError> for Fault {
    fn from(error: PickleError) -> Self {
        Fault::Input(error)
    }
}

impl From<String> for Fault {
    fn from(problem: String) -> Self {
        Fault::Bad(problem)
    }
}

impl From<&str> for Fault {
    fn from(problem: &str) -> Self {
        Fault::Bad(problem.to_string())
    }
}

enum Flow {
    Continue,
    Stop,
}

/// The unpickler's stack, mark stack, memo and arena.
#[derive(Default)]
struct Machine {
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    heap: Vec<Node>,
}

mod op {
    pub const PROTO: u8 = 0x80;
    pub const FRAME: u8 = 0x95;
    pub const STOP: u8 = b'.';
    pub const MARK: u8 = b'(';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const NONE: u8 = b'N';
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const BINFLOAT: u8 = b'G';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const BINUNICODE: u8 = b'X';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const BINBYTES8: u8 = 0x8e;
    pub const BYTEARRAY8: u8 = 0x96;
    pub const EMPTY_DICT: u8 = b'}';
    pub const EMPTY_LIST: u8 = b']';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const EMPTY_SET: u8 = 0x8f;
    pub const DICT: u8 = b'd';
    pub const LIST: u8 = b'l';
    pub const TUPLE: u8 = b't';
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const FROZENSET: u8 = 0x91;
    pub const APPEND: u8 = b'a';
    pub const APPENDS: u8 = b'e';
    pub const ADDITEMS: u8 = 0x90;
    pub const SETITEM: u8 = b's';
    pub const SETITEMS: u8 = b'u';
    pub const GLOBAL: u8 = b'c';
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const MEMOIZE: u8 = 0x94;
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const BUILD: u8 = b'b';
    pub const NEWOBJ: u8 = 0x81;
    pub const NEWOBJ_EX: u8 = 0x92;
}

/// Names of the opcodes this machine runs, for messages.
fn opcode_name(opcode: u8) -> Option<&'static str> {
    use op::*;
    Some(match opcode {
        PROTO => "PROTO",
        FRAME => "FRAME",
        MARK => "MARK",
        POP => "POP",
        POP_MARK => "POP_MARK",
        DUP => "DUP",
        BININT | BININT1 | BININT2 | LONG1 | LONG4 => "integer",
        BINSTRING | SHORT_BINSTRING | BINUNICODE | SHORT_BINUNICODE | BINUNICODE8 => "string",
        BINBYTES | SHORT_BINBYTES | BINBYTES8 | BYTEARRAY8 => "bytes",
        DICT => "DICT",
        LIST => "LIST",
        TUPLE | TUPLE1 | TUPLE2 | TUPLE3 => "TUPLE",
        FROZENSET => "FROZENSET",
        APPEND | APPENDS | ADDITEMS => "APPENDS",
        SETITEM | SETITEMS => "SETITEMS",
        GLOBAL | STACK_GLOBAL => "GLOBAL",
        BINPUT | LONG_BINPUT | MEMOIZE => "PUT",
        BINGET | LONG_BINGET => "GET",
        BINPERSID => "BINPERSID",
        REDUCE => "REDUCE",
        BUILD => "BUILD",
        NEWOBJ | NEWOBJ_EX => "NEWOBJ",
        STOP => "STOP",
        _ => return None,
    })
}

impl Machine {
    fn step<R: Read>(&mut self, opcode: u8, input: &mut Input<R>) -> Result<Flow, Fault> {
        use op::*;
        match opcode {
            PROTO => self.protocol(input)?,
            FRAME => {
                input.array::<8>()?;
            }
            STOP => return Ok(Flow::Stop),
            MARK => self.marks.push(self.stack.len()),
            POP => {
                self.pop()?;
            }
            POP_MARK => {
                self.pop_mark()?;
            }
            DUP => self.stack.push(self.top()?.clone()),
            NONE => self.stack.push(Value::None),
            NEWTRUE => self.stack.push(Value::Bool(true)),
            NEWFALSE => self.stack.push(Value::Bool(false)),
            BININT | BININT1 | BININT2 | LONG1 | LONG4 => self.integer(opcode, input)?,
            BINFLOAT => self.stack.push(Value::Float(f64::from_be_bytes(input.array()?))),
            BINSTRING | SHORT_BINSTRING | BINUNICODE | SHORT_BINUNICODE | BINUNICODE8 => self.text(opcode, input)?,
            BINBYTES | SHORT_BINBYTES | BINBYTES8 | BYTEARRAY8 => self.byte_string(opcode, input)?,
            EMPTY_DICT => self.push_node(Node::Dict(Vec::new())),
            EMPTY_LIST | EMPTY_SET => self.push_node(Node::List(Vec::new())),
            EMPTY_TUPLE => self.push_node(Node::Tuple(Vec::new())),
            DICT => self.dict_from_mark()?,
            LIST | FROZENSET => {
                let items = self.pop_mark()?;
                self.push_node(Node::List(items))
            }
            TUPLE => {
                let items = self.pop_mark()?;
                self.push_node(Node::Tuple(items))
            }
            TUPLE1 | TUPLE2 | TUPLE3 => self.small_tuple(usize::from(opcode - TUPLE1) + 1)?,
            APPEND => {
                let item = self.pop()?;
                self.extend_list(vec![item])?
            }
            APPENDS | ADDITEMS => {
                let items = self.pop_mark()?;
                self.extend_list(items)?
            }
            SETITEM => {
                let items = self.pop_n(2)?;
                self.set_items(items)?
            }
            SETITEMS => {
                let items = self.pop_mark()?;
                self.set_items(items)?
            }
            GLOBAL => {
                let module = input.line()?;
                let name = input.line()?;
                self.stack.push(Value::Global { module, name })
            }
            STACK_GLOBAL => self.stack_global()?,
            BINPUT => self.put(u64::from(input.array::<1>()?[0]))?,
            LONG_BINPUT => self.put(u64::from(u32::from_le_bytes(input.array()?)))?,
            MEMOIZE => self.put(self.memo.len() as u64)?,
            BINGET => self.get(u64::from(input.array::<1>()?[0]))?,
            LONG_BINGET => self.get(u64::from(u32::from_le_bytes(input.array()?)))?,
            BINPERSID => self.persistent_load()?,
            REDUCE => self.reduce()?,
            BUILD => self.build()?,
            NEWOBJ => self.new_object(false)?,
            NEWOBJ_EX => self.new_object(true)?,
            _ => return Err(unsupported(opcode)),
        }
        Ok(Flow::Continue)
    }

    fn finish(mut self, at: u64) -> Result<Pickle, PickleError> {
        let root = self.stack.pop().ok_or_else(|| PickleError { at, problem: "STOP with an empty stack".into() })?;
        Ok(Pickle { root, heap: self.heap })
    }

    fn protocol<R: Read>(&mut self, input: &mut Input<R>) -> Result<(), Fault> {
        let [version] = input.array::<1>()?;
        if version > 5 {
            return Err(format!("pickle protocol {version} is newer than 5").into());
        }
        Ok(())
    }

    // ----- stack ---------------------------------------------------------------------------------

    fn pop(&mut self) -> Result<Value, Fault> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err("the stack is empty".into());
        }
        self.stack.pop().ok_or_else(|| "the stack is empty".into())
    }

    fn pop_n(&mut self, count: usize) -> Result<Vec<Value>, Fault> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() < floor + count {
            return Err(format!("needs {count} values on the stack, found {}", self.stack.len() - floor).into());
        }
        Ok(self.stack.split_off(self.stack.len() - count))
    }

    fn top(&self) -> Result<&Value, Fault> {
        self.stack.last().ok_or_else(|| "the stack is empty".into())
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, Fault> {
        let mark = self.marks.pop().ok_or("no MARK on the stack")?;
        Ok(self.stack.split_off(mark.min(self.stack.len())))
    }

    fn push_node(&mut self, node: Node) {
        self.heap.push(node);
        self.stack.push(Value::Node(self.heap.len() - 1));
    }

    fn node_mut(&mut self, value: &Value) -> Option<&mut Node> {
        match value {
            Value::Node(index) => self.heap.get_mut(*index),
            _ => None,
        }
    }

    fn node(&self, value: &Value) -> Option<&Node> {
        match value {
            Value::Node(index) => self.heap.get(*index),
            _ => None,
        }
    }

    // ----- scalars -------------------------------------------------------------------------------

    fn integer<R: Read>(&mut self, opcode: u8, input: &mut Input<R>) -> Result<(), Fault> {
        let value = match opcode {
            op::BININT => i128::from(i32::from_le_bytes(input.array()?)),
            op::BININT1 => i128::from(input.array::<1>()?[0]),
            op::BININT2 => i128::from(u16::from_le_bytes(input.array()?)),
            op::LONG1 => {
                let count = input.array::<1>()?[0];
                little_endian_int(&input.bytes(u64::from(count))?)?
            }
            _ => {
                let count = i32::from_le_bytes(input.array()?);
                let count = u64::try_from(count).map_err(|_| format!("negative length {count}"))?;
                if count > 16 {
                    return Err(format!("integer of {count} bytes is too large").into());
                }
                little_endian_int(&input.bytes(count)?)?
            }
        };
        self.stack.push(Value::Int(value));
        Ok(())
    }

    fn text<R: Read>(&mut self, opcode: u8, input: &mut Input<R>) -> Result<(), Fault> {
        let count = match opcode {
            op::SHORT_BINSTRING | op::SHORT_BINUNICODE => u64::from(input.array::<1>()?[0]),
            op::BINSTRING => {
                let count = i32::from_le_bytes(input.array()?);
                u64::try_from(count).map_err(|_| format!("negative length {count}"))?
            }
            op::BINUNICODE => u64::from(u32::from_le_bytes(input.array()?)),
            _ => u64::from_le_bytes(input.array()?),
        };
        let bytes = input.bytes(count)?;
        let value = match String::from_utf8(bytes) {
            Ok(text) => Value::Str(text),
            Err(error) if matches!(opcode, op::BINSTRING | op::SHORT_BINSTRING) => Value::Bytes(error.into_bytes()),
            Err(error) => Value::Str(String::from_utf8_lossy(error.as_bytes()).into_owned()),
        };
        self.stack.push(value);
        Ok(())
    }

    fn byte_string<R: Read>(&mut self, opcode: u8, input: &mut Input<R>) -> Result<(), Fault> {
        let count = match opcode {
            op::SHORT_BINBYTES => u64::from(input.array::<1>()?[0]),
            op::BINBYTES => u64::from(u32::from_le_bytes(input.array()?)),
            _ => u64::from_le_bytes(input.array()?),
        };
        let bytes = input.bytes(count)?;
        self.stack.push(Value::Bytes(bytes));
        Ok(())
    }

    // ----- containers ----------------------------------------------------------------------------

    fn small_tuple(&mut self, count: usize) -> Result<(), Fault> {
        let items = self.pop_n(count)?;
        self.push_node(Node::Tuple(items));
        Ok(())
    }

    fn dict_from_mark(&mut self) -> Result<(), Fault> {
        let items = self.pop_mark()?;
        let pairs = pairs(items)?;
        self.push_node(Node::Dict(pairs));
        Ok(())
    }

    fn extend_list(&mut self, items: Vec<Value>) -> Result<(), Fault> {
        let target = self.top()?.clone();
        match self.node_mut(&target) {
            Some(Node::List(list)) => list.extend(items),
            Some(Node::Object { .. }) => {}
            _ => return Err(format!("cannot append to {}", self.describe(&target)).into()),
        }
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<(), Fault> {
        let pairs = pairs(items)?;
        let target = self.top()?.clone();
        match self.node_mut(&target) {
            Some(Node::Dict(dict)) => dict.extend(pairs),
            Some(Node::Object { .. }) => {}
            _ => return Err(format!("cannot set items of {}", self.describe(&target)).into()),
        }
        Ok(())
    }

    // ----- memo ----------------------------------------------------------------------------------

    fn put(&mut self, key: u64) -> Result<(), Fault> {
        let value = self.top()?.clone();
        self.memo.insert(key, value);
        Ok(())
    }

    fn get(&mut self, key: u64) -> Result<(), Fault> {
        let value = self.memo.get(&key).ok_or_else(|| format!("memo entry {key} was never stored"))?;
        self.stack.push(value.clone());
        Ok(())
    }

    // ----- classes and objects -------------------------------------------------------------------

    fn stack_global(&mut self) -> Result<(), Fault> {
        let name = self.pop()?;
        let module = self.pop()?;
        let (Value::Str(module), Value::Str(name)) = (module, name) else {
            return Err("module and name must be strings".into());
        };
        self.stack.push(Value::Global { module, name });
        Ok(())
    }

    fn reduce(&mut self) -> Result<(), Fault> {
        let args = self.pop()?;
        let callable = self.pop()?;
        let items = match self.node(&args) {
            Some(Node::Tuple(items)) => items.clone(),
            _ => return Err(format!("arguments must be a tuple, found {}", self.describe(&args)).into()),
        };
        let result = self.call(&callable, &args, &items)?;
        self.stack.push(result);
        Ok(())
    }

    fn call(&mut self, callable: &Value, args: &Value, items: &[Value]) -> Result<Value, Fault> {
        let Value::Global { module, name } = callable else {
            return Ok(self.object(callable.clone(), args.clone()));
        };
        match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") => self.ordered_dict(items),
            ("torch._utils", "_rebuild_tensor" | "_rebuild_tensor_v2") => self.rebuild_tensor(items),
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") | ("torch", "Size") => {
                items.first().cloned().ok_or_else(|| format!("{module}.{name} needs an argument").into())
            }
            _ => Ok(self.object(callable.clone(), args.clone())),
        }
    }

    fn object(&mut self, class: Value, args: Value) -> Value {
        self.heap.push(Node::Object { class, args, state: None });
        Value::Node(self.heap.len() - 1)
    }

    /// `OrderedDict()`, or Python 2's `OrderedDict([[key, value], ...])`.
    fn ordered_dict(&mut self, items: &[Value]) -> Result<Value, Fault> {
        let mut entries = Vec::new();
        if let Some(first) = items.first() {
            let Some(Node::List(pairs) | Node::Tuple(pairs)) = self.node(first) else {
                return Err(format!("OrderedDict expects a list of pairs, found {}", self.describe(first)).into());
            };
            for pair in pairs {
                match self.node(pair) {
                    Some(Node::List(kv) | Node::Tuple(kv)) if kv.len() == 2 => {
                        entries.push((kv[0].clone(), kv[1].clone()))
                    }
                    _ => return Err("OrderedDict expects [key, value] pairs".into()),
                }
            }
        }
        self.heap.push(Node::Dict(entries));
        Ok(Value::Node(self.heap.len() - 1))
    }

    /// `_rebuild_tensor(storage, offset, size, stride)`, `_v2` adding requires_grad, hooks and metadata.
    fn rebuild_tensor(&mut self, items: &[Value]) -> Result<Value, Fault> {
        if items.len() < 4 {
            return Err(format!("_rebuild_tensor expects at least 4 arguments, found {}", items.len()).into());
        }
        let storage = match self.node(&items[0]) {
            Some(Node::Storage(storage)) => storage.clone(),
            _ => {
                return Err(
                    format!("tensor storage must be a persistent id, found {}", self.describe(&items[0])).into()
                );
            }
        };
        let offset = as_i64(&items[1]).ok_or("the storage offset must be an integer")?;
        let size = self.int_sequence(&items[2], "size")?;
        let stride = self.int_sequence(&items[3], "stride")?;
        if size.len() != stride.len() {
            return Err(format!("size {size:?} and stride {stride:?} differ in length").into());
        }
        self.heap.push(Node::Tensor(TensorRef { storage, offset, size, stride }));
        Ok(Value::Node(self.heap.len() - 1))
    }

    fn int_sequence(&self, value: &Value, what: &str) -> Result<Vec<i64>, Fault> {
        let bad = || format!("the tensor {what} must be a tuple of integers, found {}", self.describe(value));
        let Some(Node::Tuple(items) | Node::List(items)) = self.node(value) else { return Err(bad().into()) };
        items.iter().map(|item| as_i64(item).ok_or_else(|| bad().into())).collect()
    }

    fn build(&mut self) -> Result<(), Fault> {
        let new_state = self.pop()?;
        let target = self.top()?.clone();
        if let Some(Node::Object { state, .. }) = self.node_mut(&target) {
            *state = Some(new_state);
        }
        Ok(())
    }

    fn new_object(&mut self, with_kwargs: bool) -> Result<(), Fault> {
        if with_kwargs {
            self.pop()?;
        }
        let args = self.pop()?;
        let class = self.pop()?;
        let object = self.object(class, args);
        self.stack.push(object);
        Ok(())
    }

    /// `BINPERSID`: PyTorch's `('storage', ...)` ids, and `('module', class, ...)` for saved modules.
    fn persistent_load(&mut self) -> Result<(), Fault> {
        let id = self.pop()?;
        let items = match self.node(&id) {
            Some(Node::Tuple(items)) if !items.is_empty() => items.clone(),
            _ => return Err(format!("persistent id must be a non-empty tuple, found {}", self.describe(&id)).into()),
        };
        match text_of(&items[0]).as_deref() {
            Some("storage") => {
                let storage = self.storage_ref(&items)?;
                self.push_node(Node::Storage(storage));
            }
            Some("module") => self.stack.push(items.get(1).cloned().unwrap_or(Value::None)),
            _ => return Err(format!("unknown persistent id type {}", self.describe(&items[0])).into()),
        }
        Ok(())
    }

    fn storage_ref(&self, items: &[Value]) -> Result<StorageRef, Fault> {
        if !(5..=6).contains(&items.len()) {
            return Err(format!("storage persistent id has {} fields, expected 5 or 6", items.len()).into());
        }
        let type_name = match &items[1] {
            Value::Global { module, name } => format!("{module}.{name}"),
            other => return Err(format!("storage type must be a class, found {}", self.describe(other)).into()),
        };
        let key = key_text(&items[2]).ok_or("storage key must be a string")?;
        let location = text_of(&items[3]).unwrap_or_default();
        let numel = as_u64(&items[4]).ok_or("storage size must be a non-negative integer")?;
        let view = match items.get(5) {
            None | Some(Value::None) => None,
            Some(view) => Some(self.storage_view(view)?),
        };
        Ok(StorageRef { type_name, key, location, numel, view })
    }

    fn storage_view(&self, view: &Value) -> Result<(String, u64, u64), Fault> {
        let bad = || format!("storage view must be (key, offset, size), found {}", self.describe(view));
        match self.node(view) {
            Some(Node::Tuple(items)) if items.len() == 3 => {
                let key = key_text(&items[0]).ok_or_else(bad)?;
                let offset = as_u64(&items[1]).ok_or_else(bad)?;
                let size = as_u64(&items[2]).ok_or_else(bad)?;
                Ok((key, offset, size))
            }
            _ => Err(bad().into()),
        }
    }

    /// A short description of a value for messages.
    fn describe(&self, value: &Value) -> String {
        match value {
            Value::None => "None".into(),
            Value::Bool(flag) => format!("the boolean {flag}"),
            Value::Int(number) => format!("the integer {number}"),
            Value::Float(number) => format!("the float {number}"),
            Value::Str(text) => format!("the string '{}'", text.chars().take(40).collect::<String>()),
            Value::Bytes(bytes) => format!("{} bytes", bytes.len()),
            Value::Global { module, name } => format!("the global {module}.{name}"),
            Value::Node(_) => match self.node(value) {
                Some(Node::Tuple(items)) => format!("a tuple of {}", items.len()),
                Some(Node::List(items)) => format!("a list of {}", items.len()),
                Some(Node::Dict(items)) => format!("a dict of {}", items.len()),
                Some(Node::Object { class, .. }) => format!("an object of {}", self.describe(class)),
                Some(Node::Storage(storage)) => format!("a storage {}", storage.type_name),
                Some(Node::Tensor(_)) => "a tensor".into(),
                None => "a dangling reference".into(),
            },
        }
    }
}

fn unsupported(opcode: u8) -> Fault {
    let printable = if opcode.is_ascii_graphic() { format!(" ('{}')", opcode as char) } else { String::new() };
    Fault::Bad(format!("unsupported pickle opcode 0x{opcode:02x}{printable}"))
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>, Fault> {
    if !items.len().is_multiple_of(2) {
        return Err(format!("needs key/value pairs, found {} values", items.len()).into());
    }
    let mut iter = items.into_iter();
    let mut result = Vec::new();
    while let (Some(key), Some(value)) = (iter.next(), iter.next()) {
        result.push((key, value));
    }
    Ok(result)
}

/// Two's-complement little-endian integer of up to 16 bytes (`LONG1`/`LONG4`).
fn little_endian_int(bytes: &[u8]) -> Result<i128, Fault> {
    if bytes.len() > 16 {
        return Err(format!("integer of {} bytes is too large", bytes.len()).into());
    }
    let Some(&last) = bytes.last() else { return Ok(0) };
    let fill = if last & 0x80 != 0 { 0xff } else { 0 };
    let mut wide = [fill; 16];
    wide[..bytes.len()].copy_from_slice(bytes);
    Ok(i128::from_le_bytes(wide))
}

fn as_i64(value: &Value) -> Option<i64> {
    match value {
        Value::Int(number) => i64::try_from(*number).ok(),
        _ => None,
    }
}

fn as_u64(value: &Value) -> Option<u64> {
    match value {
        Value::Int(number) => u64::try_from(*number).ok(),
        _ => None,
    }
}

/// The text of a `str`, or of a Python 2 byte string.
pub fn text_of(value: &Value) -> Option<String> {
    match value {
        Value::Str(text) => Some(text.clone()),
        Value::Bytes(bytes) => std::str::from_utf8(bytes).ok().map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> Result<Pickle, PickleError> {
        load(&mut Input::new(bytes, bytes.len() as u64))
    }

    fn dict_items(pickle: &Pickle) -> Vec<(Value, Value)> {
        match pickle.node(&pickle.root) {
            Some(Node::Dict(items)) => items.clone(),
            other => panic!("expected a dict, got {other:?}"),
        }
    }

    #[test]
    fn reads_a_protocol_2_dict_of_scalars() {
        // pickle.dumps({'a': 5, 'b': -2, 'c': 1.5, 'd': True, 'e': None}, protocol=2)
        let bytes = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x05X\x01\x00\x00\x00bq\x02J\xfe\xff\xff\xff\
            X\x01\x00\x00\x00cq\x03G?\xf8\x00\x00\x00\x00\x00\x00X\x01\x00\x00\x00dq\x04\x88X\x01\x00\x00\x00eq\x05Nu.";
        let pickle = run(bytes).expect("valid pickle");
        let items = dict_items(&pickle);
        let values: Vec<Value> = items.iter().map(|(_, v)| v.clone()).collect();
        assert_eq!(values, [Value::Int(5), Value::Int(-2), Value::Float(1.5), Value::Bool(true), Value::None]);
        assert_eq!(items[0].0, Value::Str("a".into()));
    }

    #[test]
    fn reads_protocol_4_frames_short_strings_memoize_and_stack_global() {
        // d = OrderedDict(x=[1, 2]); d['y'] = d['x']; pickle.dumps(d, protocol=4)
        let bytes =
            b"\x80\x04\x95\x36\x00\x00\x00\x00\x00\x00\x00\x8c\x0bcollections\x94\x8c\x0bOrderedDict\x94\x93\x94)R\x94\
            (\x8c\x01x\x94]\x94(K\x01K\x02e\x8c\x01y\x94h\x05u.";
        let pickle = run(bytes).expect("valid pickle");
        let items = dict_items(&pickle);
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].1, items[0].1, "BINGET of the memoized list refers to the same node");
        assert_eq!(pickle.node(&items[0].1), Some(&Node::List(vec![Value::Int(1), Value::Int(2)])));
    }

    #[test]
    fn long1_holds_the_pytorch_magic_number_and_negative_numbers() {
        let magic = run(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.").expect("valid");
        assert_eq!(magic.root, Value::Int(0x1950a86a20f9469cfc6c));
        let negative = run(b"\x80\x02\x8a\x01\xff.").expect("valid");
        assert_eq!(negative.root, Value::Int(-1));
    }

    #[test]
    fn rebuilds_a_tensor_from_a_storage_persistent_id() {
        // {'w': _rebuild_tensor_v2(('storage', torch.HalfStorage, '7', 'cpu', 6, None), 1, (2, 2), (3, 1), False, OrderedDict())}
        let bytes =
            b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00storage\
            ctorch\nHalfStorage\nX\x01\x00\x00\x007X\x03\x00\x00\x00cpuK\x06NtQK\x01K\x02K\x02\x86K\x03K\x01\x86\x89\
            ccollections\nOrderedDict\n)RtRs.";
        let pickle = run(bytes).expect("valid pickle");
        let tensors = pickle.tensors().expect("flattens");
        assert_eq!(tensors.len(), 1);
        let (name, tensor) = &tensors[0];
        assert_eq!(name, "w");
        assert_eq!(tensor.storage.type_name, "torch.HalfStorage");
        assert_eq!(tensor.storage.key, "7");
        assert_eq!(tensor.storage.numel, 6);
        assert_eq!((tensor.offset, tensor.size.clone(), tensor.stride.clone()), (1, vec![2, 2], vec![3, 1]));
        assert_eq!(pickle.storages().count(), 1);
    }

    #[test]
    fn nested_dicts_and_lists_flatten_to_dotted_names() {
        // {'state_dict': {'module.conv1_1.weight': T}, 'opt': [T]} with T rebuilt by _rebuild_tensor
        let tensor =
            b"ctorch._utils\n_rebuild_tensor\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000\
            X\x03\x00\x00\x00cpuK\x01tQK\x00K\x01\x85K\x01\x85tR";
        let mut bytes = b"\x80\x02}(X\x0a\x00\x00\x00state_dict}X\x15\x00\x00\x00module.conv1_1.weight".to_vec();
        bytes.extend_from_slice(tensor);
        bytes.extend_from_slice(b"sX\x03\x00\x00\x00opt]");
        bytes.extend_from_slice(tensor);
        bytes.extend_from_slice(b"au.");
        let pickle = run(&bytes).expect("valid pickle");
        let names: Vec<String> = pickle.tensors().expect("flattens").into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["state_dict.module.conv1_1.weight", "opt.0"]);
    }

    #[test]
    fn module_objects_flatten_without_their_private_levels() {
        // A pickled nn.Module: NEWOBJ of a class, BUILD with {'_modules': {'features': {'_parameters': {'weight': T}}}}.
        let mut bytes = b"\x80\x02cmy\nNet\n)\x81}X\x08\x00\x00\x00_modules}X\x08\x00\x00\x00featurescmy\nSeq\n)\x81\
            }X\x0b\x00\x00\x00_parameters}X\x06\x00\x00\x00weight"
            .to_vec();
        bytes.extend_from_slice(
            b"ctorch._utils\n_rebuild_tensor\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000\
              X\x03\x00\x00\x00cpuK\x01tQK\x00K\x01\x85K\x01\x85tR",
        );
        bytes.extend_from_slice(b"ssbssb.");
        let pickle = run(&bytes).expect("valid pickle");
        let names: Vec<String> = pickle.tensors().expect("flattens").into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["features.weight"]);
    }

    #[test]
    fn python2_ordered_dict_with_a_list_of_pairs() {
        // OrderedDict([['k', 1]]) as Python 2.7 pickled it: REDUCE with ([['k', 1]],), SHORT_BINSTRING key.
        let bytes = b"\x80\x02ccollections\nOrderedDict\nq\x00]q\x01]q\x02(U\x01kK\x01ea\x85Rq\x03.";
        let pickle = run(bytes).expect("valid pickle");
        assert_eq!(dict_items(&pickle), [(Value::Str("k".into()), Value::Int(1))]);
    }

    #[test]
    fn unknown_classes_become_inert_objects() {
        let pickle = run(b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.").expect("valid pickle");
        assert!(matches!(pickle.node(&pickle.root), Some(Node::Object { .. })));
    }

    #[test]
    fn unsupported_opcode_is_named_with_its_byte() {
        let error = run(b"\x80\x02K\x01I01\n.").expect_err("INT is not supported");
        assert_eq!(error.at, 4);
        assert!(error.problem.contains("unsupported pickle opcode 0x49 ('I')"), "{error}");
    }

    #[test]
    fn truncation_says_where_the_file_ends() {
        let error = run(b"\x80\x02X\x10\x00\x00\x00abc").expect_err("truncated");
        assert!(error.problem.contains("file truncated") && error.problem.contains("ends at byte 10"), "{error}");
        let error = run(b"\x80\x02K\x01").expect_err("no STOP");
        assert!(error.problem.contains("no STOP"), "{error}");
    }

    #[test]
    fn huge_lengths_are_refused_before_allocating() {
        let error = run(b"\x80\x02\x8d\xff\xff\xff\xff\xff\xff\xff\x7f.").expect_err("too long");
        assert!(error.problem.contains("file truncated"), "{error}");
    }

    #[test]
    fn bad_programs_are_errors_not_panics() {
        for (bytes, expected) in [
            (&b"\x80\x02."[..], "empty stack"),
            (b"\x80\x02h\x03.", "memo entry 3"),
            (b"\x80\x02K\x01u.", "no MARK"),
            (b"\x80\x02K\x01K\x02s.", "SETITEMS"),
            (b"\x80\x02K\x01K\x02R.", "arguments must be a tuple"),
            (b"\x80\x02(X\x01\x00\x00\x00xtQ.", "unknown persistent id type"),
            (b"\x80\x02(K\x01K\x02K\x03u.", "pairs"),
            (b"\x80\x02\x86.", "needs 2 values"),
            (b"\x80\x09.", "protocol 9"),
        ] {
            let error = run(bytes).expect_err("invalid program");
            assert!(error.to_string().contains(expected), "{bytes:?}: {error}");
        }
    }

    #[test]
    fn deep_and_cyclic_structures_are_bounded() {
        // A list that contains itself: the walk visits it once.
        let cyclic = run(b"\x80\x02]q\x00h\x00a.").expect("valid pickle");
        assert!(cyclic.tensors().expect("finite").is_empty());
        // 100 000 nested tuples: built without recursion, refused when walked too deep.
        let mut deep = b"\x80\x02)".to_vec();
        deep.extend(std::iter::repeat_n(0x85u8, 100_000));
        deep.push(b'.');
        let pickle = run(&deep).expect("valid pickle");
        assert!(pickle.tensors().expect_err("too deep").contains("nested more than"));
    }
}
