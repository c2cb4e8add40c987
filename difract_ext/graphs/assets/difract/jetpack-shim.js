// difract-ext: the small part of the "d3-jetpack" helper API that circuit-tracer's frontend uses,
// written for d3 v7 (event-first listeners). It replaces the jetpack and npy scripts that the
// stock pages load from a CDN. Load it right after d3.
(function (d3) {
  'use strict'
  if (!d3) throw new Error('jetpack-shim.js needs d3 to be loaded first')

  var proto = d3.selection.prototype
  var originalAppend = proto.append

  // SVG attributes whose names really are camelCase (everything else is kebab-cased by .at()).
  var CAMEL_ATTRS = new Set([
    'viewBox', 'preserveAspectRatio', 'gradientUnits', 'gradientTransform', 'spreadMethod',
    'patternUnits', 'patternTransform', 'markerWidth', 'markerHeight', 'markerUnits', 'refX',
    'refY', 'textLength', 'lengthAdjust', 'startOffset', 'stdDeviation', 'clipPathUnits',
    'maskUnits', 'pathLength', 'filterUnits', 'primitiveUnits',
  ])
  // CSS properties that get 'px' appended when given a bare number.
  var PX_STYLES = new Set([
    'top', 'left', 'right', 'bottom', 'width', 'height', 'min-width', 'max-width', 'min-height',
    'max-height', 'font-size', 'line-height', 'margin', 'margin-top', 'margin-left',
    'margin-right', 'margin-bottom', 'padding', 'padding-top', 'padding-left', 'padding-right',
    'padding-bottom', 'border-radius', 'border-width', 'stroke-width',
  ])

  function kebab(name) {
    return name.replace(/([a-z\d])([A-Z])/g, '$1-$2').toLowerCase()
  }

  // 'div.a.b#c' -> {tag: 'div', classes: 'a b', id: 'c'}
  function parseName(name) {
    var tag = name.match(/^[^.#]*/)[0]
    var classes = [], id = null
    var re = /([.#])([^.#]+)/g, m
    while ((m = re.exec(name))) {
      if (m[1] === '.') classes.push(m[2])
      else id = m[2]
    }
    return {tag: tag, classes: classes.join(' '), id: id}
  }

  function decorate(sel, parsed) {
    if (parsed.classes) sel.attr('class', parsed.classes)
    if (parsed.id) sel.attr('id', parsed.id)
    return sel
  }

  // append('tag.class#id') adds the element and sets its class and id.
  proto.append = function (name) {
    if (typeof name !== 'string') return originalAppend.call(this, name)
    var parsed = parseName(name)
    return decorate(originalAppend.call(this, parsed.tag), parsed)
  }

  // appendMany('tag.class', data): one new element per datum.
  proto.appendMany = function (name, data) {
    return this.selectAll(null).data(data).enter().append(name)
  }

  // selectAppend('tag.class'): the first matching child of each element, created when missing.
  proto.selectAppend = function (name) {
    var parsed = parseName(name)
    var create = d3.creator(parsed.tag)
    var sel = this.select(function () {
      return this.querySelector(name) || this.appendChild(create.apply(this, arguments))
    })
    return decorate(sel, parsed)
  }

  // at({strokeWidth: 1}) / at('name', value): attributes with camelCase keys.
  proto.at = function (name, value) {
    if (typeof name === 'object') {
      for (var key in name) this.attr(CAMEL_ATTRS.has(key) ? key : kebab(key), name[key])
      return this
    }
    return arguments.length === 1 ? this.attr(name) : this.attr(name, value)
  }

  function withPx(value) {
    if (typeof value === 'function') {
      return function () { return withPx(value.apply(this, arguments)) }
    }
    return typeof value === 'number' ? value + 'px' : value
  }

  // st({fontSize: 12}) / st('name', value): styles with camelCase keys; numbers become px.
  proto.st = function (name, value) {
    var self = this
    function set(key, val) {
      var prop = kebab(key)
      self.style(prop, PX_STYLES.has(prop) ? withPx(val) : val)
    }
    if (typeof name === 'object') {
      for (var key in name) set(key, name[key])
      return this
    }
    if (arguments.length === 1) return this.style(kebab(name))
    set(name, value)
    return this
  }

  // translate([x, y]) or translate(fn) ; translate(v, 0|1) moves along one axis only.
  proto.translate = function (xy, dim) {
    function point(d, i, el) {
      var p = typeof xy === 'function' ? xy.call(el, d, i) : xy
      if (dim === 0) return [p, 0]
      if (dim === 1) return [0, p]
      return p
    }
    var node = this.node()
    if (!node) return this
    if (node.getBBox) {
      return this.attr('transform', function (d, i) {
        var p = point(d, i, this)
        return 'translate(' + p[0] + ',' + p[1] + ')'
      })
    }
    return this.style('transform', function (d, i) {
      var p = point(d, i, this)
      return 'translate(' + p[0] + 'px,' + p[1] + 'px)'
    })
  }

  // parent(): the distinct parents of the selected elements.
  proto.parent = function () {
    var seen = new Set()
    return this.filter(function () {
      if (seen.has(this.parentNode)) return false
      seen.add(this.parentNode)
      return true
    }).select(function () { return this.parentNode })
  }

  // nestBy(array, key): arrays of items sharing a key, in first-seen order, each with .key.
  d3.nestBy = function (array, key) {
    var groups = new Map()
    Array.from(array).forEach(function (d, i) {
      var k = String(key(d, i))
      if (!groups.has(k)) {
        var group = []
        group.key = k
        groups.set(k, group)
      }
      groups.get(k).push(d)
    })
    return Array.from(groups.values())
  }

  d3.clamp = function (min, value, max) {
    return Math.max(min, Math.min(max, value))
  }

  // conventions({sel, margin, layers}): sized svg/canvas/div layers plus x/y scales and axes.
  d3.conventions = function (c) {
    c = c || {}
    var margin = Object.assign({}, c.margin || {})
    ;['top', 'right', 'bottom', 'left'].forEach(function (k) {
      if (margin[k] === undefined || margin[k] === null) margin[k] = 20
    })
    c.margin = margin
    if (c.parentSel) c.sel = c.parentSel
    c.sel = c.sel || d3.select('body')
    var node = c.sel.node()
    c.totalWidth = c.totalWidth || (node && node.offsetWidth) || 960
    c.totalHeight = c.totalHeight || (node && node.offsetHeight) || 500
    c.width = c.width || c.totalWidth - margin.left - margin.right
    c.height = c.height || c.totalHeight - margin.top - margin.bottom
    c.totalWidth = c.width + margin.left + margin.right
    c.totalHeight = c.height + margin.top + margin.bottom

    c.sel.st({position: 'relative', height: c.totalHeight, width: c.totalWidth})
    c.x = c.x || d3.scaleLinear().range([0, c.width])
    c.y = c.y || d3.scaleLinear().range([c.height, 0])
    c.xAxis = c.xAxis || d3.axisBottom(c.x)
    c.yAxis = c.yAxis || d3.axisLeft(c.y)

    var stacked = Boolean(c.layers)
    c.layers = (c.layers || 's').split('').map(function (type) {
      if (type === 's') {
        var g = c.sel.append('svg')
          .st({position: stacked ? 'absolute' : ''})
          .attr('width', c.totalWidth)
          .attr('height', c.totalHeight)
          .append('g')
          .attr('transform', 'translate(' + margin.left + ',' + margin.top + ')')
        if (!c.svg) c.svg = g
        return g
      }
      if (type === 'c') {
        var ratio = window.devicePixelRatio || 1
        var ctx = c.sel.append('canvas')
          .at({width: c.totalWidth * ratio, height: c.totalHeight * ratio})
          .st({width: c.totalWidth, height: c.totalHeight, position: 'absolute'})
          .node().getContext('2d')
        ctx.scale(ratio, ratio)
        ctx.translate(margin.left, margin.top)
        return ctx
      }
      if (type === 'd') {
        return c.sel.append('div').st({
          position: 'absolute', left: margin.left, top: margin.top,
          width: c.width, height: c.height,
        })
      }
      throw new Error('d3.conventions: unknown layer type ' + type)
    })

    c.drawAxis = function (svg) {
      svg = svg || c.svg
      svg.append('g.axis.x').translate([0, c.height]).call(c.xAxis)
      svg.append('g.axis.y').call(c.yAxis)
    }
    return c
  }

  // attachTooltip(sel, tooltipSel, fieldFns): show fieldFns(d) in tooltipSel while hovering.
  d3.attachTooltip = function (sel, tooltipSel, fieldFns) {
    if (!sel.size()) return
    tooltipSel = tooltipSel || d3.select('.tooltip')
    var datum = sel.datum()
    if (!fieldFns) {
      fieldFns = Object.keys(datum || {})
        .filter(function (k) { return typeof datum[k] !== 'object' })
        .map(function (k) { return function (d) { return k + ': <b>' + d[k] + '</b>' } })
    }
    sel
      .on('mouseover.attachTooltip', function (ev, d) {
        tooltipSel.classed('tooltip-hidden', false).html('')
          .appendMany('div', fieldFns).html(function (fn) { return fn(d) })
        d3.select(this).classed('tooltipped', true)
      })
      .on('mousemove.attachTooltip', function (ev) {
        if (!tooltipSel.size()) return
        var bb = tooltipSel.node().getBoundingClientRect()
        var left = d3.clamp(20, ev.clientX - bb.width / 2, window.innerWidth - bb.width - 20)
        var top = window.innerHeight > ev.clientY + 20 + bb.height
          ? ev.clientY + 20 : ev.clientY - bb.height - 20
        tooltipSel.style('left', left + 'px').style('top', top + 'px')
      })
      .on('mouseout.attachTooltip', function () {
        tooltipSel.classed('tooltip-hidden', true)
        d3.selectAll('.tooltipped').classed('tooltipped', false)
      })
  }

  // The stock pages reference npyjs only for .npy files, which difract graphs never use.
  window.npyjs = window.npyjs || {
    parse: function () { throw new Error('.npy files are not supported by the difract frontend') },
  }
})(window.d3)
