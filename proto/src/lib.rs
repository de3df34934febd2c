//! zc-proto: everything the zc host and guest must agree on, byte for byte.
//!
//! Nothing here does I/O. The pool layout (`layout`), the buffer layout and
//! handles (`buffer`), bounds-checked access to packet bytes in a mapped pool
//! (`packet`), the name grammar (`name`) and the API every transport
//! implements (`api`).

pub mod api;
pub mod buffer;
pub mod layout;
pub mod name;
pub mod packet;
pub mod virtio;

pub use api::{QueueEnd, Receiver, Sender};
pub use buffer::{BufferHandle, BufferIndex};
pub use layout::{ExportEntry, LayoutError, PoolHeader, PoolLayout};
pub use name::{ClusterId, Name, NameError, QueueId};
pub use packet::{PacketMut, PacketRef, PoolMemory, PoolView};
